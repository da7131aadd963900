"""Optimizer: AdamW with warm-up then constant / cosine / linear decay, global-norm clipping, decay on matrices."""
from __future__ import annotations

import jax
import optax

from moegrok.training.config import TrainConfig


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    warm = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    rest = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, rest, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.learning_rate, end, rest)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    # Decay only matrices (ndim >= 2): norm scales stay free, as in the prototype that preceded the project.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
