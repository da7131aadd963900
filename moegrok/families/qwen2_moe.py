"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases, no QK-norm, softmax router (top-k renormalised
if norm_topk_prob), a shared expert on every token scaled by sigmoid(x . w), dense layers by decoder_sparse_step and
mlp_only_layers (their width is `intermediate_size`; the routed experts' is `moe_intermediate_size`)."""
from __future__ import annotations

from typing import Any, Mapping

from moegrok.errors import MoegrokError
from moegrok.families.base import (Family, common_from_hf, common_to_hf, layers_from_sparse_step, merged, require)

DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
    decoder_sparse_step=1, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts_per_tok=4,
    num_experts=60, norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=None, qkv_bias=True,
)


def from_hf(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    m = merged(d, DEFAULTS)
    if m["use_sliding_window"]:
        raise MoegrokError(f"{where}: use_sliding_window=True is not supported (Qwen2-MoE's per-layer windows)")
    if not m["shared_expert_intermediate_size"]:
        raise MoegrokError(f"{where}: shared_expert_intermediate_size must be > 0 (Qwen2-MoE always has one)")
    return dict(common_from_hf(m, where, 10000.0), intermediate_size=m["moe_intermediate_size"],
                dense_intermediate_size=m["intermediate_size"], num_experts=m["num_experts"],
                num_experts_per_tok=m["num_experts_per_tok"], norm_topk_prob=bool(m["norm_topk_prob"]),
                qk_norm=False, qkv_bias=bool(m["qkv_bias"]),
                shared_expert_intermediate_size=m["shared_expert_intermediate_size"], shared_expert_gate=True,
                dense_layers=layers_from_sparse_step(m["num_hidden_layers"], m["decoder_sparse_step"],
                                                     m["mlp_only_layers"], where),
                router_aux_loss_coef=float(m["router_aux_loss_coef"]))


def to_hf(cfg) -> dict[str, Any]:
    require(cfg, "Qwen2-MoE", qk_norm=False, router="softmax", shared_expert_gate=True, partial_rotary_factor=1.0,
            sliding_window=None, clip_qkv=None, routed_scaling_factor=1.0)
    if not cfg.shared_expert_intermediate_size:
        raise MoegrokError("model config: Qwen2-MoE needs a shared expert (shared_expert_intermediate_size > 0)")
    return dict(common_to_hf(cfg), moe_intermediate_size=cfg.intermediate_size,
                intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size, num_experts=cfg.num_experts,
                norm_topk_prob=cfg.norm_topk_prob, qkv_bias=cfg.qkv_bias,
                shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, decoder_sparse_step=1,
                mlp_only_layers=list(cfg.dense_layers), router_aux_loss_coef=cfg.router_aux_loss_coef)


FAMILY = Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", from_hf, to_hf, DEFAULTS,
                shared_module="shared_expert")
