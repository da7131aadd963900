"""Tables, correlations and figures for the theory outputs. No NaN ever reaches a table: undefined values are "n/a"
and the row says why."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats

NA = "n/a"
MIN_CORR_N = 3


def _constant(v: np.ndarray) -> bool:
    # Round-off differences (a d_eff recomputed from identical routing) are not variation to correlate.
    return bool(np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())))


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson and Spearman with p-values and n; "n/a" plus a note when too few points or a constant series."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(xa.size)
    out: dict[str, Any] = {"n": n, "pearson_r": NA, "pearson_p": NA, "spearman_r": NA, "spearman_p": NA,
                           "note": ""}
    if n < MIN_CORR_N:
        out["note"] = f"n/a: {n} points, need >= {MIN_CORR_N}"
        return out
    if _constant(xa) or _constant(ya):
        out["note"] = "n/a: a series is constant"
        return out
    pr = scipy.stats.pearsonr(xa, ya)
    sr = scipy.stats.spearmanr(xa, ya)
    out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue), spearman_r=float(sr.statistic),
               spearman_p=float(sr.pvalue))
    for k in ("pearson_r", "pearson_p", "spearman_r", "spearman_p"):  # ties can still make spearman undefined
        if not math.isfinite(out[k]):
            out[k] = NA
            out["note"] = "n/a: undefined for these values (ties)"
    return out


def _cell(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return NA if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows (union of keys, first-seen order); non-finite floats become "n/a"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval=NA)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
    return path


def fmt(v: Any, spec: str = ".3f") -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NA
    return format(v, spec)


def fmt_p(p: Any) -> str:
    if isinstance(p, str):
        return p
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def corr_text(c: Mapping[str, Any]) -> str:
    if c["note"]:
        return f"{c['note']} (n = {c['n']})"
    return (f"Pearson r = {fmt(c['pearson_r'])} (p = {fmt_p(c['pearson_p'])}), Spearman ρ = {fmt(c['spearman_r'])} "
            f"(p = {fmt_p(c['spearman_p'])}), n = {c['n']}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt
