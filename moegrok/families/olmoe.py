"""OLMoE (allenai/OLMoE-1B-7B): QK-norm over the whole projection, optional clip_qkv, softmax router over all
experts, top-k not renormalised by default, every layer MoE, no shared expert."""
from __future__ import annotations

from typing import Any, Mapping

from moegrok.errors import MoegrokError
from moegrok.families.base import Family, common_from_hf, common_to_hf, merged, require

# OlmoeConfig's defaults for the keys read here (so loading does not import transformers; a test checks them).
DEFAULTS: dict[str, Any] = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02,
    rms_norm_eps=1e-5, pad_token_id=1, bos_token_id=None, eos_token_id=50279, tie_word_embeddings=False,
    attention_bias=False, clip_qkv=None, num_experts_per_tok=8, num_experts=64, router_aux_loss_coef=0.01,
    norm_topk_prob=False,
)


def from_hf(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    m = merged(d, DEFAULTS)
    if m["attention_bias"]:
        raise MoegrokError(f"{where}: attention_bias=True is not supported (OLMoE has no biases)")
    return dict(common_from_hf(m, where, 10000.0), intermediate_size=m["intermediate_size"],
                num_experts=m["num_experts"], num_experts_per_tok=m["num_experts_per_tok"],
                norm_topk_prob=bool(m["norm_topk_prob"]), clip_qkv=m["clip_qkv"],
                router_aux_loss_coef=float(m["router_aux_loss_coef"]))


def to_hf(cfg) -> dict[str, Any]:
    require(cfg, "OLMoE", qk_norm=True, qk_norm_per_head=False, qkv_bias=False, router="softmax",
            shared_expert_intermediate_size=0, dense_layers=(), partial_rotary_factor=1.0, sliding_window=None,
            routed_scaling_factor=1.0, attention_head_dim=None)
    return dict(common_to_hf(cfg), intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
                norm_topk_prob=cfg.norm_topk_prob, clip_qkv=cfg.clip_qkv, attention_bias=False,
                router_aux_loss_coef=cfg.router_aux_loss_coef)


FAMILY = Family("olmoe", "OlmoeForCausalLM", "OlmoeConfig", from_hf, to_hf, DEFAULTS)
