"""What every family shares: the `Family` entry, the config fields all decoders have, and the one map between our
parameters and Hugging Face tensor keys.

A family module (`moegrok/families/<model_type>.py`) gives only what differs: how its config.json translates to
`MoeConfig` switches and back, and the names its checkpoints use for the MoE block, the experts' projections and the
shared expert. Everything below the names (which tensor is transposed, how per-expert tensors stack into our
`[E, D, 2I]` parameter) is decided once, here.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

from moegrok.errors import MoegrokError


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # what save_hf writes as config.json's "architectures"
    hf_config_class: str  # the transformers config class (imported by save_hf and tests only)
    # config.json dict -> MoeConfig keyword arguments (raises MoegrokError naming the key it cannot honour)
    from_hf: Callable[[Mapping[str, Any], str], dict[str, Any]]
    # MoeConfig -> config.json keyword arguments of `hf_config_class` (raises for switches the family lacks)
    to_hf: Callable[[Any], dict[str, Any]]
    defaults: Mapping[str, Any]  # the config class's defaults for every key `from_hf` reads (tests check them)
    moe_module: str = "mlp"  # layer attribute holding router and experts ("block_sparse_moe" for Mixtral)
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_module: str | None = None
    # Checkpoints may hold layers past num_hidden_layers that the HF model skips too (GLM's multi-token prediction).
    extra_layers_ignored: bool = False


# ------------------------------------------------------------------------------------------------ config.json
COMMON_DEFAULTS = dict(hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, head_dim=None,
                       pad_token_id=None, bos_token_id=None, eos_token_id=None)


def merged(d: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """config.json over the family's defaults (config.json may omit any key its class has a default for)."""
    return {**COMMON_DEFAULTS, **defaults, **d}


def first_id(v):
    return v[0] if isinstance(v, (list, tuple)) and v else v


def rope(d: Mapping[str, Any], where: str, default_theta: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers 5's `rope_parameters` or the older top-level keys;
    only plain RoPE is supported (scaled variants change positions in ways this decoder does not model)."""
    if d.get("rope_scaling") is not None:  # the pre-5.0 name for non-default RoPE
        raise MoegrokError(f"{where}: rope_scaling {d['rope_scaling']!r} is not supported (only default RoPE)")
    rp = d.get("rope_parameters") or {}
    if not isinstance(rp, Mapping):
        raise MoegrokError(f"{where}: rope_parameters must be an object, got {rp!r}")
    if rp.get("rope_type", "default") != "default":
        raise MoegrokError(f"{where}: rope_type {rp.get('rope_type')!r} is not supported (only 'default')")
    theta = rp.get("rope_theta", d.get("rope_theta", default_theta))
    factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    return float(theta), float(factor)


def common_from_hf(m: Mapping[str, Any], where: str, default_theta: float) -> dict[str, Any]:
    """The decoder fields every family shares; `m` is config.json merged with the family's defaults."""
    if m["hidden_act"] != "silu":
        raise MoegrokError(f"{where}: hidden_act {m['hidden_act']!r} is not supported (only 'silu')")
    theta, factor = rope(m, where, default_theta)
    heads = m["num_attention_heads"]
    head_dim = m["head_dim"] or m["hidden_size"] // heads
    return dict(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=m.get("num_key_value_heads") or heads,
        max_position_embeddings=m["max_position_embeddings"], rope_theta=theta, partial_rotary_factor=factor,
        rms_norm_eps=float(m["rms_norm_eps"]), tie_word_embeddings=bool(m["tie_word_embeddings"]),
        initializer_range=float(m["initializer_range"]), pad_token_id=m["pad_token_id"],
        bos_token_id=first_id(m["bos_token_id"]), eos_token_id=first_id(m["eos_token_id"]),
        # transformers takes head_dim, else hidden_size // heads (floored: GLM-4.5's defaults give 4096 / 96).
        attention_head_dim=None if head_dim * heads == m["hidden_size"] else head_dim,
    )


def common_to_hf(cfg) -> dict[str, Any]:
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        rope_parameters["partial_rotary_factor"] = cfg.partial_rotary_factor
    out = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope_parameters,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, hidden_act="silu", num_experts_per_tok=cfg.num_experts_per_tok,
    )
    if cfg.attention_head_dim:
        out["head_dim"] = cfg.attention_head_dim
    return out


def require(cfg, family: str, **expected: Any) -> None:
    """Refuse, naming every field, a model whose switches this family's Hugging Face class cannot express."""
    bad = [f"{k}={getattr(cfg, k)!r} (the family needs {v!r})" for k, v in expected.items() if getattr(cfg, k) != v]
    if cfg.position_embedding != "rope":
        bad.append(f"position_embedding={cfg.position_embedding!r}")
    if bad:
        raise MoegrokError(f"model config: {', '.join(bad)} has no Hugging Face {family} counterpart")


def layers_from_sparse_step(n_layers: int, step: Any, mlp_only: Any, where: str) -> tuple[int, ...]:
    """Qwen-MoE's rule: layer i has experts iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step
    == 0. Returns the dense layers."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise MoegrokError(f"{where}: decoder_sparse_step must be a positive integer, got {step!r}")
    mlp_only = list(mlp_only or [])
    if not all(isinstance(i, int) for i in mlp_only):
        raise MoegrokError(f"{where}: mlp_only_layers must list layer indices, got {mlp_only!r}")
    return tuple(i for i in range(n_layers) if i in mlp_only or (i + 1) % step)


# ------------------------------------------------------------------------------------------------ tensor map
@dataclasses.dataclass(frozen=True)
class Part:
    """One Hugging Face tensor and where it sits in one of our parameters: `param[index] = hf.T if transposed`.
    `stacked`: the HF tensor is a fused `[E, out, in]` stack, transposed expert by expert."""
    key: str
    hf_shape: tuple[int, ...]
    index: tuple = ()
    transposed: bool = False
    stacked: bool = False


@dataclasses.dataclass(frozen=True)
class ParamMap:
    path: tuple[str, ...]  # our parameter (as `get_params` names it)
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    experts: bool = False  # per-expert parts: read through a reused scratch buffer


def _swiglu(path: tuple[str, ...], prefix: str, names: tuple[str, str, str], D: int, I: int) -> list[ParamMap]:
    """A dense SwiGLU (`gate_up [D, 2I]`, `down [I, D]`) from HF's three `[out, in]` Linear weights."""
    g, u, d = (f"{prefix}.{n}.weight" for n in names)
    return [ParamMap(path + ("gate_up",), (D, 2 * I), (Part(g, (I, D), (slice(None), slice(0, I)), True),
                                                       Part(u, (I, D), (slice(None), slice(I, 2 * I)), True))),
            ParamMap(path + ("down",), (I, D), (Part(d, (D, I), (), True),))]


def tensor_map(cfg, fam: Family, fused_layers: frozenset[int] = frozenset()) -> list[ParamMap]:
    """Every parameter of `MoeLM(cfg)` and the HF tensors it is made of, in HF's module order. `fused_layers`:
    MoE layers whose checkpoint stores the experts fused (`experts.gate_up_proj [E, 2I, D]`, `down_proj
    [E, D, I]`), as transformers 5 holds them in memory; otherwise one tensor per expert and projection, as Hub
    checkpoints and `save_pretrained` have them."""
    D, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    q, kv, hd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    out = [ParamMap(("embed",), (V, D), (Part("model.embed_tokens.weight", (V, D)),))]
    for i in range(cfg.num_hidden_layers):
        L, p = ("layers", str(i)), f"model.layers.{i}."
        A = L + ("attn",)
        for ours, name, n in (("wq", "q_proj", q), ("wk", "k_proj", kv), ("wv", "v_proj", kv)):
            out.append(ParamMap(A + (ours,), (D, n), (Part(p + f"self_attn.{name}.weight", (n, D), (), True),)))
        if cfg.qkv_bias:
            for ours, name, n in (("bq", "q_proj", q), ("bk", "k_proj", kv), ("bv", "v_proj", kv)):
                out.append(ParamMap(A + (ours,), (n,), (Part(p + f"self_attn.{name}.bias", (n,)),)))
        out.append(ParamMap(A + ("wo",), (q, D), (Part(p + "self_attn.o_proj.weight", (D, q), (), True),)))
        if cfg.qk_norm:
            nq_, nk_ = (hd, hd) if cfg.qk_norm_per_head else (q, kv)
            out.append(ParamMap(A + ("q_norm", "scale"), (nq_,), (Part(p + "self_attn.q_norm.weight", (nq_,)),)))
            out.append(ParamMap(A + ("k_norm", "scale"), (nk_,), (Part(p + "self_attn.k_norm.weight", (nk_,)),)))
        out.append(ParamMap(L + ("input_norm", "scale"), (D,), (Part(p + "input_layernorm.weight", (D,)),)))
        out.append(ParamMap(L + ("post_attn_norm", "scale"), (D,),
                            (Part(p + "post_attention_layernorm.weight", (D,)),)))
        if i in cfg.dense_layers:
            out += _swiglu(L + ("mlp",), p + "mlp", fam.expert_proj, D, cfg.dense_intermediate_size or I)
            continue
        M, m = L + ("moe",), p + fam.moe_module + "."
        out.append(ParamMap(M + ("router",), (D, E), (Part(m + "gate.weight", (E, D), (), True),)))
        if cfg.router == "sigmoid":
            out.append(ParamMap(M + ("selection_bias",), (E,), (Part(m + "gate.e_score_correction_bias", (E,)),)))
        if i in fused_layers:
            out.append(ParamMap(M + ("gate_up",), (E, D, 2 * I),
                                (Part(m + "experts.gate_up_proj", (E, 2 * I, D), (), True, True),)))
            out.append(ParamMap(M + ("down",), (E, I, D), (Part(m + "experts.down_proj", (E, D, I), (), True, True),)))
        else:
            g, u, d = (m + "experts.{e}." + n + ".weight" for n in fam.expert_proj)
            out.append(ParamMap(M + ("gate_up",), (E, D, 2 * I), tuple(
                Part(k.format(e=e), (I, D), (e, slice(None), sl), True)
                for k, sl in ((g, slice(0, I)), (u, slice(I, 2 * I))) for e in range(E)), experts=True))
            out.append(ParamMap(M + ("down",), (E, I, D), tuple(
                Part(d.format(e=e), (D, I), (e,), True) for e in range(E)), experts=True))
        if cfg.shared_expert_intermediate_size:
            out += _swiglu(M + ("shared",), m + fam.shared_module, fam.expert_proj, D,
                           cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_gate:
                out.append(ParamMap(M + ("shared_gate",), (D, 1),
                                    (Part(m + fam.shared_module + "_gate.weight", (1, D), (), True),)))
    out.append(ParamMap(("norm", "scale"), (D,), (Part("model.norm.weight", (D,)),)))
    if not cfg.tie_word_embeddings:
        out.append(ParamMap(("lm_head",), (D, V), (Part("lm_head.weight", (V, D), (), True),)))
    return out


def ignored(fam: Family, cfg, key: str) -> bool:
    """A checkpoint tensor the family's HF model does not load either."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return fam.extra_layers_ignored and m is not None and int(m.group(1)) >= cfg.num_hidden_layers
