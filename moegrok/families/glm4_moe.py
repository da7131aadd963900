"""GLM-4.5 / GLM-4.6 (zai-org/GLM-4.5-Air): DeepSeek-V3-style routing — sigmoid scores, a selection bias
(`e_score_correction_bias`) that decides the choice only, group-limited top-k, `routed_scaling_factor` on the mixing
weights — plus shared experts (ungated, `n_shared_experts` x `moe_intermediate_size` wide), dense first layers
(`first_k_dense_replace`), plain GQA attention with optional q/k/v biases and per-head QK-norm, and RoPE on a fraction
of each head (`partial_rotary_factor`, 0.5 by default). Multi-token-prediction layers stored after the last decoder
layer are ignored, as transformers ignores them."""
from __future__ import annotations

from typing import Any, Mapping

from moegrok.errors import MoegrokError
from moegrok.families.base import Family, common_from_hf, common_to_hf, merged, require

DEFAULTS: dict[str, Any] = dict(
    vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=False,
    moe_intermediate_size=1408, num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128,
    routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
    use_qk_norm=False,
)


def from_hf(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    m = merged(d, DEFAULTS)
    if "partial_rotary_factor" not in (d.get("rope_parameters") or {}) and "partial_rotary_factor" not in d:
        m["partial_rotary_factor"] = 0.5  # Glm4MoeConfig's default, set in its __post_init__
    experts = d.get("n_routed_experts", d.get("num_local_experts", m["n_routed_experts"]))
    first_dense = m["first_k_dense_replace"]
    if not isinstance(first_dense, int) or first_dense < 0:
        raise MoegrokError(f"{where}: first_k_dense_replace must be an integer >= 0, got {first_dense!r}")
    n_shared = m["n_shared_experts"]
    if not isinstance(n_shared, int) or n_shared < 0:
        raise MoegrokError(f"{where}: n_shared_experts must be an integer >= 0, got {n_shared!r}")
    return dict(common_from_hf(m, where, 10000.0), intermediate_size=m["moe_intermediate_size"],
                dense_intermediate_size=m["intermediate_size"], num_experts=experts,
                num_experts_per_tok=m["num_experts_per_tok"], norm_topk_prob=bool(m["norm_topk_prob"]),
                qk_norm=bool(m["use_qk_norm"]), qk_norm_per_head=True, qkv_bias=bool(m["attention_bias"]),
                router="sigmoid", n_group=m["n_group"], topk_group=m["topk_group"],
                routed_scaling_factor=float(m["routed_scaling_factor"]),
                shared_expert_intermediate_size=n_shared * m["moe_intermediate_size"],
                dense_layers=tuple(range(min(first_dense, m["num_hidden_layers"]))))


def to_hf(cfg) -> dict[str, Any]:
    require(cfg, "GLM-4.5 (glm4_moe)", router="sigmoid", shared_expert_gate=False, sliding_window=None,
            clip_qkv=None)
    if cfg.qk_norm and not cfg.qk_norm_per_head:
        raise MoegrokError("model config: glm4_moe's QK-norm is per head (qk_norm_per_head: true)")
    if cfg.dense_layers != tuple(range(len(cfg.dense_layers))):
        raise MoegrokError(f"model config: glm4_moe keeps only the first layers dense (first_k_dense_replace); "
                           f"dense_layers {list(cfg.dense_layers)} is not 0..n-1")
    if cfg.shared_expert_intermediate_size % cfg.intermediate_size:
        raise MoegrokError("model config: glm4_moe's shared experts are n_shared_experts x intermediate_size wide; "
                           f"{cfg.shared_expert_intermediate_size} is not a multiple of {cfg.intermediate_size}")
    out = dict(common_to_hf(cfg), moe_intermediate_size=cfg.intermediate_size,
               intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size,
               n_routed_experts=cfg.num_experts, norm_topk_prob=cfg.norm_topk_prob, use_qk_norm=cfg.qk_norm,
               attention_bias=cfg.qkv_bias, n_group=cfg.n_group, topk_group=cfg.topk_group,
               routed_scaling_factor=cfg.routed_scaling_factor,
               n_shared_experts=cfg.shared_expert_intermediate_size // cfg.intermediate_size,
               first_k_dense_replace=len(cfg.dense_layers))
    # Glm4MoeConfig fills a missing factor with 0.5: write 1.0 explicitly too.
    out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    return out


FAMILY = Family("glm4_moe", "Glm4MoeForCausalLM", "Glm4MoeConfig", from_hf, to_hf, DEFAULTS,
                shared_module="shared_experts", extra_layers_ignored=True)
