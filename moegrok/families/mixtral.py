"""Mixtral (mistralai/Mixtral-8x7B): no QK-norm, no biases, softmax router with the top-k always renormalised,
every layer MoE, optional sliding window. Checkpoints name the block `block_sparse_moe` and the experts' projections
w1 (gate), w3 (up), w2 (down). Router jitter acts in training only and is not modelled."""
from __future__ import annotations

from typing import Any, Mapping

from moegrok.families.base import Family, common_from_hf, common_to_hf, merged, require

DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=None, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, bos_token_id=1,
    eos_token_id=2, sliding_window=None, num_experts_per_tok=2, num_local_experts=8, router_aux_loss_coef=0.001,
)


def from_hf(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    m = merged(d, DEFAULTS)
    return dict(common_from_hf(m, where, 1e6), intermediate_size=m["intermediate_size"],
                num_experts=m["num_local_experts"], num_experts_per_tok=m["num_experts_per_tok"],
                norm_topk_prob=True, qk_norm=False, sliding_window=m["sliding_window"],
                router_aux_loss_coef=float(m["router_aux_loss_coef"]))


def to_hf(cfg) -> dict[str, Any]:
    require(cfg, "Mixtral", qk_norm=False, qkv_bias=False, router="softmax", norm_topk_prob=True,
            shared_expert_intermediate_size=0, dense_layers=(), partial_rotary_factor=1.0, clip_qkv=None,
            routed_scaling_factor=1.0)
    return dict(common_to_hf(cfg), intermediate_size=cfg.intermediate_size, num_local_experts=cfg.num_experts,
                sliding_window=cfg.sliding_window, router_aux_loss_coef=cfg.router_aux_loss_coef)


FAMILY = Family("mixtral", "MixtralForCausalLM", "MixtralConfig", from_hf, to_hf, DEFAULTS,
                moe_module="block_sparse_moe", expert_proj=("w1", "w3", "w2"))
