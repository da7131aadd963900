"""Model config: one frozen dataclass that round-trips with Hugging Face's `OlmoeConfig`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from moegrok.errors import MoegrokError

MOE_IMPLS = ("auto", "dense", "ragged", "ragged_dot", "blocked", "tokamax")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
DTYPES = ("float32", "bfloat16")
POSITION_EMBEDDINGS = ("rope", "learned")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """OLMoE-architecture decoder (METHOD §8). Field names follow `OlmoeConfig` where one exists.

    Defaults are a small CPU model; `olmoe_1b_7b()` gives the real shapes.
    """

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 64  # per expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: = num_attention_heads
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.01  # Switch load balancing, as HF
    router_z_loss_coef: float = 0.001  # OLMoE pretraining also used a router z-loss
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: int | None = 50279
    # Not in OlmoeConfig: how we compute.
    dtype: str = "float32"  # activations / matmul dtype
    param_dtype: str = "float32"
    # Controlled-study options, off by default (the defaults are OLMoE; a model with any of them on has no HF OLMoE
    # counterpart and refuses conversion): GPT-2-style learned absolute positions instead of RoPE, and no QK-norm.
    position_embedding: str = "rope"  # "rope" | "learned" (a [max_position_embeddings, hidden] table added to x)
    qk_norm: bool = True
    # Expert path (moegrok/model/moe.py): "auto" picks by platform; "dense" (every expert: the reference),
    # "ragged", "ragged_dot", "blocked", "tokamax" — all dropless and equal to each other.
    moe_impl: str = "auto"
    # Attention (moegrok/model/layers.py): "auto" = cuDNN's fused kernel on NVIDIA GPUs in bfloat16, else "einsum";
    # "xla" = jax.nn.dot_product_attention's XLA path. All equal in float32.
    attention_impl: str = "auto"
    # Recompute each decoder layer's activations in the backward pass instead of storing them (less memory for
    # deep many-expert models, ~1/3 more compute).
    remat: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self.validate()

    # -- derived --
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        def bad(field, msg):
            raise MoegrokError(f"model config: field '{field}' {msg}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_experts", "num_experts_per_tok", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"({self.hidden_size}) must be divisible by num_attention_heads "
                               f"({self.num_attention_heads})")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            bad("position_embedding", f"must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if not isinstance(self.qk_norm, bool):
            bad("qk_norm", f"must be true or false, got {self.qk_norm!r}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            bad("hidden_size", f"/ num_attention_heads = head_dim {self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                                       f"({self.num_attention_heads})")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}], got "
                                       f"{self.num_experts_per_tok}")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", f"must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if not isinstance(self.remat, bool):
            bad("remat", f"must be true or false, got {self.remat!r}")
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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MoegrokError(f"model config: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    # -- Hugging Face --
    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> "MoeConfig":
        """From a `transformers.OlmoeConfig` (or its dict). Raises MoegrokError for another model_type."""
        if isinstance(hf, Mapping):
            from transformers import OlmoeConfig as HFOlmoeConfig

            if hf.get("model_type", "olmoe") != "olmoe":
                raise MoegrokError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'olmoe'")
            hf = HFOlmoeConfig(**{k: v for k, v in hf.items() if k != "model_type"})
        if getattr(hf, "model_type", None) != "olmoe":
            raise MoegrokError(f"config: model_type is {getattr(hf, 'model_type', None)!r}, expected 'olmoe'")
        rope = getattr(hf, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise MoegrokError(f"config: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        if getattr(hf, "attention_bias", False):
            raise MoegrokError("config: attention_bias=True is not supported (OLMoE has no biases)")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise MoegrokError(f"config: hidden_act {hf.hidden_act!r} is not supported (only 'silu')")
        eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, (list, tuple)) else hf.eos_token_id
        kw = dict(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads, num_experts=hf.num_experts,
            num_experts_per_tok=hf.num_experts_per_tok, norm_topk_prob=bool(hf.norm_topk_prob),
            max_position_embeddings=hf.max_position_embeddings, rope_theta=float(theta),
            rms_norm_eps=float(hf.rms_norm_eps), clip_qkv=hf.clip_qkv,
            tie_word_embeddings=bool(hf.tie_word_embeddings), initializer_range=float(hf.initializer_range),
            router_aux_loss_coef=float(hf.router_aux_loss_coef), pad_token_id=hf.pad_token_id,
            bos_token_id=hf.bos_token_id, eos_token_id=eos,
        )
        kw.update(overrides)
        return cls(**kw)

    def olmoe_incompatibilities(self) -> list[str]:
        """The fields set away from OLMoE's architecture (no Hugging Face OLMoE model can hold such weights)."""
        out = []
        if self.position_embedding != "rope":
            out.append(f"position_embedding={self.position_embedding!r}")
        if not self.qk_norm:
            out.append("qk_norm=false")
        return out

    def to_hf_config(self):
        bad = self.olmoe_incompatibilities()
        if bad:
            raise MoegrokError(f"model config: {', '.join(bad)} has no Hugging Face OLMoE counterpart; only "
                               "OLMoE-architecture models convert")
        from transformers import OlmoeConfig as HFOlmoeConfig

        return HFOlmoeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok, norm_topk_prob=self.norm_topk_prob,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps, clip_qkv=self.clip_qkv, tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range, router_aux_loss_coef=self.router_aux_loss_coef,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            hidden_act="silu", attention_bias=False,
        )


def olmoe_1b_7b(**overrides: Any) -> MoeConfig:
    """The published OLMoE-1B-7B shapes (METHOD §8)."""
    base = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                num_attention_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                clip_qkv=None, pad_token_id=1, eos_token_id=50279)
    base.update(overrides)
    return MoeConfig(**base)


OlmoeConfig = MoeConfig  # the name users of HF expect
