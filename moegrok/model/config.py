"""Model config: one frozen dataclass that round-trips with Hugging Face's `OlmoeConfig`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from moegrok.config_values import check_fields
from moegrok.errors import MoegrokError

MOE_IMPLS = ("auto", "dense", "ragged", "ragged_dot", "blocked", "tokamax")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
DTYPES = ("float32", "bfloat16")
POSITION_EMBEDDINGS = ("rope", "learned")


ROUTERS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A pre-norm MoE decoder (METHOD §8). Field names follow Hugging Face's configs where one exists.

    The defaults are OLMoE's architecture at a small CPU size (`olmoe_1b_7b()` gives the real shapes); the switches
    below the OLMoE fields are what the other families (`moegrok/families/`) need, each off by default.
    """

    vocab_size: int = 128  # token ids the embedding and LM head cover (>= the tokenizer's vocabulary)
    hidden_size: int = 64  # model width d
    intermediate_size: int = 64  # per routed expert
    num_hidden_layers: int = 4  # decoder layers (MoE unless listed in dense_layers)
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int | None = None  # None: = num_attention_heads
    num_experts: int = 8  # routed experts per MoE layer (E)
    num_experts_per_tok: int = 2  # experts each token is routed to (k)
    norm_topk_prob: bool = False  # renormalise the k chosen weights to sum 1 (OLMoE: no; Mixtral: yes)
    max_position_embeddings: int = 4096  # longest sequence (RoPE) or size of the learned position table
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] after the QK-norm (OLMoE option; null: off)
    tie_word_embeddings: bool = False  # LM head = embedding matrix transposed
    initializer_range: float = 0.02  # std of the normal initialisation
    router_aux_loss_coef: float = 0.01  # Switch load balancing, as HF
    router_z_loss_coef: float = 0.001  # OLMoE pretraining also used a router z-loss
    pad_token_id: int | None = 1  # written to the Hugging Face config
    bos_token_id: int | None = None  # written to the Hugging Face config
    eos_token_id: int | None = 50279  # written to the Hugging Face config
    # Not in OlmoeConfig: how we compute.
    dtype: str = "float32"  # activations / matmul dtype
    param_dtype: str = "float32"  # parameter (master weight) dtype
    # Controlled-study options, off by default (the defaults are OLMoE; a model with any of them on has no HF OLMoE
    # counterpart and refuses conversion): GPT-2-style learned absolute positions instead of RoPE, and no QK-norm.
    position_embedding: str = "rope"  # "rope" | "learned" (a [max_position_embeddings, hidden] table added to x)
    qk_norm: bool = True  # RMSNorm on q and k before RoPE (OLMoE, Qwen3-MoE)
    # Expert path (moegrok/model/moe.py): "auto" picks by platform; "dense" (every expert: the reference),
    # "ragged", "ragged_dot", "blocked", "tokamax" — all dropless and equal to each other.
    moe_impl: str = "auto"
    # Attention (moegrok/model/layers.py): "auto" = cuDNN's fused kernel on NVIDIA GPUs in bfloat16, else "einsum";
    # "xla" = jax.nn.dot_product_attention's XLA path. All equal in float32.
    attention_impl: str = "auto"
    # Recompute each decoder layer's activations in the backward pass instead of storing them (less memory for
    # deep many-expert models, ~1/3 more compute).
    remat: bool = False
    # -- Family switches (moegrok/families/): what Mixtral, Qwen-MoE and GLM-4.5-style models differ in. --
    family: str = "olmoe"  # the Hugging Face model_type this model converts to and from
    attention_head_dim: int | None = None  # None: hidden_size // num_attention_heads
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE, GLM-4.5)
    qk_norm_per_head: bool = False  # with qk_norm: RMSNorm over each head (Qwen3, GLM) instead of the projection
    partial_rotary_factor: float = 1.0  # RoPE on the first fraction of each head's dims (GLM-4.5: 0.5)
    sliding_window: int | None = None  # keys further back than this are masked (Mixtral's option)
    router: str = "softmax"  # "softmax" (top-k of the softmax) | "sigmoid" (+ selection bias, DeepSeek-V3 style)
    n_group: int = 1  # sigmoid router: experts in n_group groups, only the best topk_group groups are eligible
    topk_group: int = 1  # sigmoid router: groups eligible per token
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' mixing weights
    shared_expert_intermediate_size: int = 0  # 0: no shared expert; else one SwiGLU on every token
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output scaled by sigmoid(x . w)
    dense_layers: tuple[int, ...] = ()  # layers with a dense SwiGLU MLP instead of experts (no router)
    dense_intermediate_size: int | None = None  # their width (None: intermediate_size)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.dense_layers, (list, tuple)):  # YAML and JSON give lists; the config stays hashable
            object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
        self.validate()

    # -- derived --
    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (Hugging Face: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The layers with a router, in order: what `router_logits`, probe records and `num_layers` count."""
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    def validate(self) -> None:
        check_fields(self, "model")

        def bad(field, msg):
            raise MoegrokError(f"model config: field '{field}' {msg}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_experts", "num_experts_per_tok", "max_position_embeddings",
                  "n_group", "topk_group"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"must be a positive integer, got {v!r}")
        for f in ("attention_head_dim", "dense_intermediate_size", "sliding_window"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(f, f"must be null or a positive integer, got {v!r}")
        v = self.shared_expert_intermediate_size
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            bad("shared_expert_intermediate_size", f"must be 0 (none) or a positive integer, got {v!r}")
        if self.attention_head_dim is None and self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"({self.hidden_size}) must be divisible by num_attention_heads "
                               f"({self.num_attention_heads})")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            bad("position_embedding", f"must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        for f in ("qk_norm", "remat", "qkv_bias", "qk_norm_per_head", "shared_expert_gate", "norm_topk_prob",
                  "tie_word_embeddings"):
            if not isinstance(getattr(self, f), bool):
                bad(f, f"must be true or false, got {getattr(self, f)!r}")
        if not 0 < self.partial_rotary_factor <= 1:
            bad("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.position_embedding == "rope" and self.rotary_dim % 2:
            bad("partial_rotary_factor", f"x head_dim {self.head_dim} = {self.rotary_dim} rotary dims; RoPE needs "
                                         "an even number")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                                       f"({self.num_attention_heads})")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}], got "
                                       f"{self.num_experts_per_tok}")
        if self.router not in ROUTERS:
            bad("router", f"must be one of {ROUTERS}, got {self.router!r}")
        if self.num_experts % self.n_group:
            bad("n_group", f"({self.n_group}) must divide num_experts ({self.num_experts})")
        if not self.topk_group <= self.n_group:
            bad("topk_group", f"({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.router != "sigmoid":
            bad("n_group", "group-limited routing is implemented for router: sigmoid only")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            bad("n_group", f"groups need >= 2 experts each (a group's score is its best two), got "
                           f"{self.num_experts // self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            bad("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds the experts of the topk_group "
                                       f"eligible groups ({self.topk_group * (self.num_experts // self.n_group)})")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            bad("shared_expert_gate", "needs a shared expert (shared_expert_intermediate_size > 0)")
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers
                   for i in self.dense_layers):
            bad("dense_layers", f"must list layer indices in [0, {self.num_hidden_layers}), got "
                                f"{list(self.dense_layers)!r}")
        if not self.moe_layer_ids:
            bad("dense_layers", "leaves no MoE layer; moegrok studies routing and needs at least one")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", f"must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                bad(f, f"must be one of {DTYPES}, got {getattr(self, f)!r}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            bad("clip_qkv", f"must be None or > 0, got {self.clip_qkv!r}")
        if not self.rope_theta > 0:
            bad("rope_theta", f"must be > 0, got {self.rope_theta!r}")

    def replace(self, **changes: Any) -> "MoeConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)  # YAML writes plain lists
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MoegrokError(f"model config: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


def olmoe_1b_7b(**overrides: Any) -> MoeConfig:
    """The published OLMoE-1B-7B shapes (METHOD §8)."""
    base = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                num_attention_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                clip_qkv=None, pad_token_id=1, eos_token_id=50279)
    base.update(overrides)
    return MoeConfig(**base)


OlmoeConfig = MoeConfig  # the name users of HF expect
