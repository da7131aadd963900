"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B): QK-norm per head, an explicit head_dim, softmax router (top-k
renormalised if norm_topk_prob), no shared expert, dense layers by decoder_sparse_step and mlp_only_layers, an
optional sliding window on every layer."""
from __future__ import annotations

from typing import Any, Mapping

from moegrok.errors import MoegrokError
from moegrok.families.base import (Family, common_from_hf, common_to_hf, layers_from_sparse_step, merged, require)

DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, attention_bias=False,
    use_sliding_window=False, sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=768,
    num_experts_per_tok=8, num_experts=128, norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=None,
)


def from_hf(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    m = merged(d, DEFAULTS)
    if m["attention_bias"]:
        raise MoegrokError(f"{where}: attention_bias=True is not supported (it adds an output-projection bias)")
    # transformers writes num_experts back as num_local_experts (an attribute alias); Hub configs say num_experts.
    experts = d.get("num_experts", d.get("num_local_experts", m["num_experts"]))
    return dict(common_from_hf(m, where, 10000.0), intermediate_size=m["moe_intermediate_size"],
                dense_intermediate_size=m["intermediate_size"], num_experts=experts,
                num_experts_per_tok=m["num_experts_per_tok"], norm_topk_prob=bool(m["norm_topk_prob"]),
                qk_norm=True, qk_norm_per_head=True,
                sliding_window=m["sliding_window"] if m["use_sliding_window"] else None,
                dense_layers=layers_from_sparse_step(m["num_hidden_layers"], m["decoder_sparse_step"],
                                                     m["mlp_only_layers"], where),
                router_aux_loss_coef=float(m["router_aux_loss_coef"]))


def to_hf(cfg) -> dict[str, Any]:
    require(cfg, "Qwen3-MoE", qk_norm=True, qk_norm_per_head=True, qkv_bias=False, router="softmax",
            shared_expert_intermediate_size=0, partial_rotary_factor=1.0, clip_qkv=None, routed_scaling_factor=1.0)
    out = dict(common_to_hf(cfg), moe_intermediate_size=cfg.intermediate_size,
               intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size, num_experts=cfg.num_experts,
               norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(cfg.dense_layers),
               attention_bias=False, use_sliding_window=cfg.sliding_window is not None,
               router_aux_loss_coef=cfg.router_aux_loss_coef, head_dim=cfg.head_dim)
    if cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
    return out


FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", from_hf, to_hf, DEFAULTS)
