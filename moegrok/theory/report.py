"""Correlation rows and their text for the theory outputs (tables, formats and figures: :mod:`moegrok.tables`). No NaN ever reaches a table: undefined values are "n/a"
and the row says why."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from moegrok.tables import NA, fmt, fmt_p

MIN_CORR_N = 3


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson and Spearman with p-values and n as a table row ("n/a" plus a note when too few points or a
    constant series); computed by :func:`moegrok.analysis.correlations.correlate`, the project's one correlation."""
    from moegrok.analysis.correlations import correlate

    c = correlate(x, y, what="a series", against="a series", min_n=MIN_CORR_N)
    out: dict[str, Any] = {"n": c.n, "pearson_r": NA, "pearson_p": NA, "spearman_r": NA, "spearman_p": NA,
                           "note": ""}
    if not c.ok:
        out["note"] = c.note
        return out
    for k in ("pearson_r", "pearson_p", "spearman_r", "spearman_p"):  # ties can still make spearman undefined
        v = getattr(c, k)
        out[k] = float(v) if math.isfinite(v) else NA
        if not math.isfinite(v):
            out["note"] = "n/a: undefined for these values (ties)"
    return out


def corr_text(c: Mapping[str, Any]) -> str:
    if c["note"]:
        return f"{c['note']} (n = {c['n']})"
    return (f"Pearson r = {fmt(c['pearson_r'])} (p = {fmt_p(c['pearson_p'])}), Spearman ρ = {fmt(c['spearman_r'])} "
            f"(p = {fmt_p(c['spearman_p'])}), n = {c['n']}")


