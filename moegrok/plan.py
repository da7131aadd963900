"""`moegrok plan CONFIG [--platform cpu|cuda|tpu] [--hlo FILE] [key=value ...]`: what a run costs before renting
hardware — parameters, bytes of weights and optimizer state, model FLOPs per training step, the expert and attention
paths the platform gets, and the train step lowered for that platform from this host (nothing is allocated).

FLOPs follow the MFU convention (PaLM, Appendix B): 6 x (matmul parameters a token goes through) per token for the
forward and backward pass, plus 12 x layers x sequence length x (heads x head dim) per token for attention scores
and values (the full, non-causal count, as MFU figures are usually quoted). Embedding lookups are not matmuls and do
not count; the LM head does. Active parameters = attention + router + k of E experts + LM head per token.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from moegrok.errors import MoegrokError

PLATFORMS = ("cpu", "cuda", "tpu")


@dataclasses.dataclass(frozen=True)
class Plan:
    platform: str
    params_total: int
    params_active: int  # matmul parameters one token goes through (MFU's N)
    param_bytes: int
    optimizer_bytes: int
    tokens_per_step: int
    seq_len: int
    flops_per_token: int
    flops_per_step: int
    moe_impl: str
    attention_impl: str

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
        rows = [("platform", self.platform),
                ("parameters (all)", f"{self.params_total:,}"),
                ("parameters active per token (matmuls)", f"{self.params_active:,}"),
                ("parameter bytes", gib(self.param_bytes)),
                ("optimizer state bytes (AdamW)", gib(self.optimizer_bytes)),
                ("tokens per step", f"{self.tokens_per_step:,} ({self.seq_len} per row)"),
                ("model FLOPs per token (6N + attention)", f"{self.flops_per_token:,}"),
                ("model FLOPs per training step", f"{self.flops_per_step:.4g}"),
                ("expert path", self.moe_impl),
                ("attention path", self.attention_impl)]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def parameter_counts(cfg) -> dict[str, int]:
    """Parameter counts by part, from the config alone (tests compare them with the built model's arrays)."""
    D, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    L, n_moe = cfg.num_hidden_layers, cfg.num_moe_layers
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = D * nq * hd + 2 * D * nkv * hd + nq * hd * D
    extra_attn = ((nq + 2 * nkv) * hd if cfg.qkv_bias else 0) + \
        ((2 * hd if cfg.qk_norm_per_head else (nq + nkv) * hd) if cfg.qk_norm else 0)
    router, expert = D * E, 3 * D * I  # gate, up, down
    S = cfg.shared_expert_intermediate_size
    shared = 3 * D * S + (D if cfg.shared_expert_gate else 0)
    moe_extra = shared + (E if cfg.router == "sigmoid" else 0)
    dense = 3 * D * (cfg.dense_intermediate_size or I)
    norms = 2 * D
    embed = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    positions = cfg.max_position_embeddings * D if cfg.position_embedding == "learned" else 0
    total = embed + head + positions + D + L * (attn + extra_attn + norms) + \
        n_moe * (router + E * expert + moe_extra) + (L - n_moe) * dense
    # the LM head is a matmul, tied or not
    active = L * attn + n_moe * (router + cfg.num_experts_per_tok * expert + shared) + (L - n_moe) * dense + V * D
    return {"total": total, "active": active, "attention": L * attn, "experts": n_moe * E * expert,
            "router": n_moe * router}


def flops_per_token(cfg, seq_len: int) -> int:
    attn = 12 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 6 * parameter_counts(cfg)["active"] + attn


def make_plan(raw_cfg: dict, platform: str) -> tuple[Plan, Any]:
    from moegrok.data import build_corpus
    from moegrok.model.layers import attention_impl_for
    from moegrok.model.moe import expert_impl_for
    from moegrok.training.train import RunConfig

    if platform not in PLATFORMS:
        raise MoegrokError(f"plan: --platform must be one of {list(PLATFORMS)}, got {platform!r}")
    cfg = RunConfig.from_dict(raw_cfg)
    from moegrok.analysis.run_metrics import AnalysisConfig
    from moegrok.theory.fromrun import RunTheoryConfig
    from moegrok.training.config import dataclass_from_dict

    for section, cls in (("analysis", AnalysisConfig), ("theory", RunTheoryConfig)):  # what `moegrok run` refuses
        dataclass_from_dict(cls, raw_cfg.get(section), section)
    corpus = build_corpus(cfg.data)
    rows, T = corpus.batch(0)["tokens"].shape
    counts = parameter_counts(cfg.model)
    pbytes = {"float32": 4, "bfloat16": 2}[cfg.model.param_dtype]
    fpt = flops_per_token(cfg.model, T)
    plan = Plan(platform=platform, params_total=counts["total"], params_active=counts["active"],
                param_bytes=counts["total"] * pbytes, optimizer_bytes=2 * counts["total"] * 4,
                tokens_per_step=rows * T, seq_len=T, flops_per_token=fpt, flops_per_step=fpt * rows * T,
                moe_impl=expert_impl_for(cfg.model.moe_impl, platform),
                attention_impl=attention_impl_for(cfg.model.attention_impl, platform, cfg.model.dtype))
    return plan, cfg


def lower_train_step(cfg, platform: str, rows: int, seq_len: int) -> str:
    """The jitted train step lowered for `platform` (StableHLO text) from abstract shapes: no weights allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moegrok.model.model import MoeLM
    from moegrok.model.platform import target_platform
    from moegrok.training.optim import make_optimizer
    from moegrok.training.train import make_train_step

    from moegrok.model.layers import attention_impl_for

    model_cfg = cfg.model
    if attention_impl_for(model_cfg.attention_impl, platform, model_cfg.dtype) == "cudnn" \
            and jax.default_backend() != "gpu":
        # cuDNN's kernels lower only where cuDNN is loaded: from another host, show the XLA attention instead.
        model_cfg = dataclasses.replace(model_cfg, attention_impl="xla")
    with target_platform(platform):
        abstract = nnx.eval_shape(lambda: MoeLM(model_cfg, seed=0))
        graphdef, state = nnx.split(abstract)
        tx = make_optimizer(cfg.train, 1000)
        opt_state = jax.eval_shape(tx.init, state)
        step = make_train_step(graphdef, tx, model_cfg, None)
        tokens = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
        mask = jax.ShapeDtypeStruct((rows, seq_len), jnp.bool_)
        lowered = step.trace(state, opt_state, tokens, mask).lower(lowering_platforms=(platform,))
    return lowered.as_text()


def register(sub) -> None:
    p = sub.add_parser("plan", help="parameters, memory, FLOPs and the lowered train step for a platform",
                       description="What a config costs before renting hardware: parameter count, bytes of "
                                   "parameters and optimizer state, model FLOPs per training step (6N + attention), "
                                   "the expert and attention paths the platform gets, and the train step lowered "
                                   "for that platform from this host (--hlo).")
    p.add_argument("config", help="YAML config, or the name of a packaged config (default, tiny, gpu, ...)")
    p.add_argument("--platform", default="cuda", choices=PLATFORMS, help="target platform (default cuda)")
    p.add_argument("--hlo", metavar="FILE", help="write the lowered train step (StableHLO text) here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from moegrok import rundir
    from moegrok.training.config import load_config_file

    plan, cfg = make_plan(load_config_file(args.config, args.overrides), args.platform)
    print(plan.table())
    if args.hlo:
        text = lower_train_step(cfg, args.platform, plan.tokens_per_step // plan.seq_len, plan.seq_len)
        rundir.write_text(Path(args.hlo), text)
        print(f"lowered train step for {args.platform}: {args.hlo} ({len(text):,} characters)")
        if plan.attention_impl == "cudnn" and "cudnn" not in text:
            print("  (attention lowered with the XLA path: cuDNN kernels lower only on a host with a GPU)")
    return 0
