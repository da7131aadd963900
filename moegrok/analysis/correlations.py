"""Correlations of per-checkpoint metrics with test accuracy (METHOD §6, the paper's Table 1, plus the controls METHOD §6
requires beyond it): Pearson and Spearman with p-values and n, first differences, partial correlation controlling
for the training step, multiple-comparison correction, and a control-run comparison.

Every result either carries numbers or a ``note`` starting with "n/a: " that says why not; nothing returns a bare NaN.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

from moegrok.errors import MoegrokError
from moegrok.tables import NA, fmt, fmt_p

NAN = float("nan")
MIN_N = 3  # fewest checkpoints a correlation is computed on


@dataclasses.dataclass(frozen=True)
class Corr:
    n: int
    pearson_r: float = NAN
    pearson_p: float = NAN
    spearman_r: float = NAN
    spearman_p: float = NAN
    note: str | None = None  # "n/a: reason" when no correlation could be computed

    @property
    def ok(self) -> bool:
        return self.note is None or not self.note.startswith("n/a")


def _na(n: int, reason: str) -> Corr:
    return Corr(n=n, note=f"n/a: {reason}")


def _is_constant(v: np.ndarray) -> bool:
    return bool(np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())))


def _paired(x, y) -> tuple[np.ndarray, np.ndarray, int]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise MoegrokError(f"correlation: series must be 1-D and of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], int((~keep).sum())


def correlate(x, y, what: str = "metric", against: str = "accuracy", min_n: int = MIN_N) -> Corr:
    """Pearson and Spearman correlation of two per-checkpoint series. Checkpoints where either is not finite (a
    metric that is n/a there) are dropped and counted in the note."""
    x, y, dropped = _paired(x, y)
    n = len(x)
    if n < min_n:
        return _na(n, f"fewer than {min_n} checkpoints with a value (n={n})")
    if _is_constant(x):
        return _na(n, f"{what} constant across checkpoints")
    if _is_constant(y):
        return _na(n, f"{against} constant across checkpoints")
    pr = scipy.stats.pearsonr(x, y)
    sr = scipy.stats.spearmanr(x, y)
    note = f"{dropped} checkpoint(s) without a value dropped" if dropped else None
    return Corr(n, float(pr.statistic), float(pr.pvalue), float(sr.statistic), float(sr.pvalue), note)


def first_differences(x, y, what: str = "metric", against: str = "accuracy") -> Corr:
    """Correlation of checkpoint-to-checkpoint changes: a shared monotone drift does not survive differencing."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return correlate(np.diff(x), np.diff(y), f"change of {what}", f"change of {against}")


def _residual(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    A = np.column_stack([np.ones_like(z), z])
    coef, *_ = np.linalg.lstsq(A, v, rcond=None)
    return v - A @ coef


def _partial_r(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float] | None:
    rx, ry = _residual(x, z), _residual(y, z)
    if _is_constant(rx) or _is_constant(ry):
        return None
    r = float(np.clip(np.dot(rx, ry) / math.sqrt(np.dot(rx, rx) * np.dot(ry, ry)), -1.0, 1.0))
    df = len(x) - 3  # two series' regressions on one covariate plus the intercept
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt(df / (1.0 - r * r))
    return r, float(2.0 * scipy.stats.t.sf(abs(t), df))


def partial_correlation(x, y, z, what: str = "metric", against: str = "accuracy") -> Corr:
    """Correlation of x and y controlling for z (the training step): Pearson of the residuals of x and y after a
    linear regression on z, p-value from Student's t with n - 3 degrees of freedom. The Spearman columns hold the
    same computed on ranks (partial rank correlation)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    x, y, z = x[keep], y[keep], z[keep]
    n = len(x)
    if n < MIN_N + 1:
        return _na(n, f"partial correlation needs at least {MIN_N + 1} checkpoints (n={n})")
    if _is_constant(x):
        return _na(n, f"{what} constant across checkpoints")
    if _is_constant(y):
        return _na(n, f"{against} constant across checkpoints")
    p = _partial_r(x, y, z)
    if p is None:
        return _na(n, f"{what} or {against} is an exact linear function of the step")
    rank = scipy.stats.rankdata
    s = _partial_r(rank(x), rank(y), rank(z))
    sr, sp = s if s is not None else (NAN, NAN)
    note = None if s is not None else "Spearman n/a: ranks are a linear function of the step's ranks"
    return Corr(n, p[0], p[1], sr, sp, note)


def adjust_pvalues(p: Sequence[float], method: str = "bh") -> np.ndarray:
    """Multiple-comparison adjusted p-values; NaN entries (n/a rows) stay NaN and do not count as tests.
    method: "bh" (Benjamini-Hochberg false discovery rate, scipy) or "holm" (Holm-Bonferroni family-wise)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return out
    q = p[ok]
    if method == "bh":
        out[ok] = scipy.stats.false_discovery_control(q, method="bh")
    elif method == "holm":
        m = len(q)
        order = np.argsort(q, kind="stable")
        stepped = np.maximum.accumulate((m - np.arange(m)) * q[order])
        adj = np.empty(m)
        adj[order] = np.minimum(stepped, 1.0)
        out[ok] = adj
    else:
        raise MoegrokError(f"p-value correction {method!r} unknown: expected 'bh' or 'holm'")
    return out


CORRECTION_NAMES = {"bh": "Benjamini-Hochberg (FDR)", "holm": "Holm-Bonferroni"}


# ----------------------------------------------------------------------------------------------------------------
# Windows and smoothing

RISE_FRACTION = 0.1
MIN_RISE = 0.05


def sustained_rise_start(accuracy_T, rise_fraction: float = RISE_FRACTION,
                         min_rise: float = MIN_RISE) -> tuple[int | None, str]:
    """Checkpoint index where the sustained rise of a domain's accuracy starts, or None, with a reason.

    Definition: let ``peak`` be the index of the maximum accuracy (first one if tied), ``base`` the minimum accuracy
    up to and including ``peak``, and ``level = base + rise_fraction * (max - base)``. The sustained rise starts at
    the *last* checkpoint at or before ``peak`` whose accuracy is <= ``level``: from the next checkpoint through the
    peak, accuracy stays above that level (later dips after the peak are kept in the window). There is no rise if
    ``max - base < min_rise`` (absolute accuracy).
    """
    a = np.asarray(accuracy_T, dtype=np.float64)
    if a.size == 0 or not np.isfinite(a).all():
        return None, "n/a: accuracy missing or not finite at some checkpoint"
    peak = int(np.argmax(a))
    base = float(a[:peak + 1].min())
    if a[peak] - base < min_rise:
        return None, f"n/a: accuracy never rises by {min_rise} (from {base:.3f} to at most {a[peak]:.3f})"
    level = base + rise_fraction * (a[peak] - base)
    start = int(np.flatnonzero(a[:peak + 1] <= level)[-1])
    return start, f"rise from checkpoint {start} (accuracy {a[start]:.3f} <= {level:.3f}) to peak {a[peak]:.3f}"


def moving_average(x, window: int = 3) -> np.ndarray:
    """Trailing moving average over checkpoints; the first window-1 points average what is available."""
    x = np.asarray(x, dtype=np.float64)
    return np.array([np.mean(x[max(0, i - window + 1):i + 1]) for i in range(len(x))])


# ----------------------------------------------------------------------------------------------------------------
# Tables

KINDS = ("raw", "diff", "partial")


@dataclasses.dataclass(frozen=True)
class CorrRow:
    domain: str
    window: str  # "all" or "rise"
    metric: str
    kind: str  # "raw", "diff" (first differences) or "partial" (controlling for step)
    corr: Corr
    pearson_p_adj: float = NAN
    spearman_p_adj: float = NAN
    control: Corr | None = None  # the control run's metric against this run's accuracy
    tracks_time: bool | None = None  # see compare_with_control


def correlate_series(domain: str, window: str, metrics: Mapping[str, np.ndarray], accuracy_T,
                     steps_T) -> list[CorrRow]:
    """All KINDS of correlation of each metric series with accuracy over the given (already windowed) checkpoints."""
    rows = []
    acc, steps = np.asarray(accuracy_T, dtype=np.float64), np.asarray(steps_T, dtype=np.float64)
    for name, series in metrics.items():
        s = np.asarray(series, dtype=np.float64)
        rows.append(CorrRow(domain, window, name, "raw", correlate(s, acc, name)))
        rows.append(CorrRow(domain, window, name, "diff", first_differences(s, acc, name)))
        rows.append(CorrRow(domain, window, name, "partial", partial_correlation(s, acc, steps, name)))
    return rows


def correct_rows(rows: Iterable[CorrRow], method: str = "bh") -> list[CorrRow]:
    """Adjust p-values within each table: one table = one (window, kind), all domains and metrics together; Pearson
    and Spearman are corrected separately."""
    rows = list(rows)
    out = list(rows)
    for key in {(r.window, r.kind) for r in rows}:
        idx = [i for i, r in enumerate(rows) if (r.window, r.kind) == key]
        pa = adjust_pvalues([rows[i].corr.pearson_p for i in idx], method)
        sa = adjust_pvalues([rows[i].corr.spearman_p for i in idx], method)
        for i, a, b in zip(idx, pa, sa):
            out[i] = dataclasses.replace(rows[i], pearson_p_adj=float(a), spearman_p_adj=float(b))
    return out


MIN_CONTROL_R = 0.3


def tracks_time(run: Corr, control: Corr, min_ratio: float = 0.5, min_r: float = MIN_CONTROL_R) -> bool | None:
    """A metric "moves the same way in the control" when the control run's series, correlated with *this* run's
    accuracy on the same checkpoints, has the same sign as the run's own correlation, at least `min_ratio` of its
    magnitude and at least `min_r` in absolute value (Pearson): then the correlation can be explained by training
    time alone. A control correlation weaker than `min_r` is noise, not a shared trend. None when either is n/a."""
    if not (run.ok and control.ok) or not (np.isfinite(run.pearson_r) and np.isfinite(control.pearson_r)):
        return None
    return bool(np.sign(run.pearson_r) == np.sign(control.pearson_r)
                and abs(control.pearson_r) >= max(min_r, min_ratio * abs(run.pearson_r)))


def compare_with_control(rows: Sequence[CorrRow], control_rows: Sequence[CorrRow],
                         only: set[str] | None = None) -> list[CorrRow]:
    """Attach the control's correlation (same domain, window, metric, kind) and the tracks-time flag to each row
    (of the domains in `only`, when given; the others are left without a control)."""
    ctl = {(r.domain, r.window, r.metric, r.kind): r.corr for r in control_rows}
    out = []
    for r in rows:
        if only is not None and r.domain not in only:
            out.append(r)
            continue
        c = ctl.get((r.domain, r.window, r.metric, r.kind))
        if c is None:
            c = _na(0, "no matching series in the control run")
        out.append(dataclasses.replace(r, control=c, tracks_time=tracks_time(r.corr, c)))
    return out


def format_cell(r: CorrRow) -> str:
    c = r.corr
    if not c.ok:
        return c.note.replace("|", "/")
    rho = (f"ρ={fmt(c.spearman_r, '+.2f')} (p={fmt_p(c.spearman_p)})" if np.isfinite(c.spearman_r)
           else f"ρ n/a ({(c.note or 'undefined').replace('|', '/')})")
    s = f"r={fmt(c.pearson_r, '+.2f')} (p={fmt_p(c.pearson_p)}, adj {fmt_p(r.pearson_p_adj)}); {rho}; n={c.n}"
    if r.tracks_time:
        s += " ⚠ same in control"
    return s


def markdown_table(rows: Sequence[CorrRow], window: str, kind: str, metric_order: Sequence[str]) -> str:
    """The paper's Table 1 layout: one row per metric, one column per domain."""
    sel = [r for r in rows if r.window == window and r.kind == kind]
    domains = sorted({r.domain for r in sel})
    cell = {(r.metric, r.domain): format_cell(r) for r in sel}
    lines = ["| metric | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for m in metric_order:
        if any((m, d) in cell for d in domains):
            lines.append(f"| {m} | " + " | ".join(cell.get((m, d), NA) for d in domains) + " |")
    return "\n".join(lines)


CSV_FIELDS = ("domain", "window", "metric", "kind", "n", "pearson_r", "pearson_p", "pearson_p_adj", "spearman_r",
              "spearman_p", "spearman_p_adj", "note", "control_n", "control_pearson_r", "control_spearman_r",
              "control_note", "tracks_time")


def row_dict(r: CorrRow) -> dict:
    c, k = r.corr, r.control
    return {
        "domain": r.domain, "window": r.window, "metric": r.metric, "kind": r.kind, "n": c.n,
        "pearson_r": c.pearson_r, "pearson_p": c.pearson_p, "pearson_p_adj": r.pearson_p_adj,
        "spearman_r": c.spearman_r, "spearman_p": c.spearman_p, "spearman_p_adj": r.spearman_p_adj,
        "note": c.note or "",
        "control_n": "" if k is None else k.n,
        "control_pearson_r": "" if k is None else k.pearson_r,
        "control_spearman_r": "" if k is None else k.spearman_r,
        "control_note": "" if k is None else (k.note or ""),
        "tracks_time": "" if r.tracks_time is None else r.tracks_time,
    }
