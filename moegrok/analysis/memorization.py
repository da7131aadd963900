"""Memorization (METHOD §2): when each training sample's loss becomes low and stays put, and the Train@t* groups.

Sample i is *memorized since* checkpoint index t* if at every checkpoint t >= t*: ``l_i(t) <= eps`` and
``|l_i(t) - l_i(T)| <= delta``. At the last checkpoint the stability condition is vacuous, so (**Decision**, as in
METHOD §2's epsilon rule) a sample counts as memorized only if t* comes *before* the last checkpoint; groups are formed
from those samples only.

Indices here are checkpoint indices 0..T-1 (position in the run's sorted step list); -1 means "never".
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from moegrok.errors import MoegrokError

DELTA = 0.05
EPS_GRID_STEP = 0.1
TARGET_SHARE = (0.20, 0.25)


@dataclasses.dataclass(frozen=True)
class MemorizationConfig:
    delta: float = DELTA
    grid_step: float = EPS_GRID_STEP
    target_low: float = TARGET_SHARE[0]
    target_high: float = TARGET_SHARE[1]
    epsilon: float | None = None  # fixed epsilon for every domain instead of the search


@dataclasses.dataclass(frozen=True)
class EpsilonChoice:
    epsilon: float
    share: float  # fraction of the domain's samples memorized before the last checkpoint
    in_target: bool  # share within [target_low, target_high]
    grid: tuple[tuple[float, float], ...]  # every (epsilon, share) tried, in search order

    def describe(self) -> str:
        where = "in" if self.in_target else "closest to the middle of, not in,"
        return f"epsilon={self.epsilon:g} (share {self.share:.3f} {where} the target range)"


def _check_loss(loss_TxN: np.ndarray) -> np.ndarray:
    loss = np.asarray(loss_TxN, dtype=np.float64)
    if loss.ndim != 2:
        raise MoegrokError(f"memorization: loss must be [checkpoints, samples], got shape {loss.shape}")
    if loss.shape[0] < 2:
        raise MoegrokError(f"memorization: needs at least 2 checkpoints (memorized *before* the last one), "
                           f"got {loss.shape[0]}")
    return loss


def memorized_since(loss_TxN: np.ndarray, epsilon: float, delta: float = DELTA) -> np.ndarray:
    """t* per sample as a checkpoint index, -1 if the sample is never memorized before the last checkpoint.

    Non-finite losses (a diverged sample) never satisfy the conditions.
    """
    loss = _check_loss(loss_TxN)
    with np.errstate(invalid="ignore"):
        ok_TxN = (loss <= epsilon) & (np.abs(loss - loss[-1]) <= delta)
    # ok from t to the end <=> logical-and accumulated from the last checkpoint backwards
    stays_TxN = np.logical_and.accumulate(ok_TxN[::-1], axis=0)[::-1]
    first = np.argmax(stays_TxN, axis=0)
    t_star = np.where(stays_TxN.any(axis=0), first, -1)
    return np.where(t_star == loss.shape[0] - 1, -1, t_star).astype(np.int64)


def memorized_share(loss_TxN: np.ndarray, epsilon: float, delta: float = DELTA) -> float:
    return float((memorized_since(loss_TxN, epsilon, delta) >= 0).mean())


def select_epsilon(loss_TxN: np.ndarray, cfg: MemorizationConfig = MemorizationConfig()) -> EpsilonChoice:
    """METHOD §2 **Decision**: search eps = step, 2 step, ... upward and take the first whose memorized share lies in
    [target_low, target_high]; if none does, the grid value whose share is closest to the range's middle (ties: the
    smaller eps). The grid ends at the first value above every finite loss: beyond it the share cannot change."""
    loss = _check_loss(loss_TxN)
    if loss.shape[1] == 0:
        raise MoegrokError("memorization: no samples in this domain")
    if cfg.epsilon is not None:
        share = memorized_share(loss, cfg.epsilon, cfg.delta)
        return EpsilonChoice(cfg.epsilon, share, cfg.target_low <= share <= cfg.target_high,
                             ((cfg.epsilon, share),))
    finite = loss[np.isfinite(loss)]
    top = float(finite.max()) if finite.size else 0.0
    n_grid = max(1, math.floor(top / cfg.grid_step) + 1)
    mid = 0.5 * (cfg.target_low + cfg.target_high)
    grid = []
    for k in range(1, n_grid + 1):
        eps = round(k * cfg.grid_step, 10)  # 0.30000000000000004 would misreport the chosen value
        share = memorized_share(loss, eps, cfg.delta)
        grid.append((eps, share))
        if cfg.target_low <= share <= cfg.target_high:
            return EpsilonChoice(eps, share, True, tuple(grid))
    best = min(grid, key=lambda es: (abs(es[1] - mid), es[0]))
    return EpsilonChoice(best[0], best[1], False, tuple(grid))


def groups_by_index(since_N: np.ndarray) -> dict[int, np.ndarray]:
    """Checkpoint index -> sorted sample indices whose t* (or t#) is that index; -1 (never) is left out."""
    since = np.asarray(since_N)
    return {int(t): np.flatnonzero(since == t) for t in np.unique(since) if t >= 0}
