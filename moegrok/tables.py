"""The one reporting toolkit every report of moegrok uses (analysis, theory, benchmark, study): the NaN convention,
the CSV writer, number formats and the plotting setup.

Convention: a number that could not be computed is written ``n/a`` (in CSV and Markdown alike, with a reason next
to it where there is one); a field that does not apply to a row is left empty in CSV.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

NA = "n/a"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def cell(v: Any) -> Any:
    """A CSV cell: non-finite numbers -> "n/a", None -> "", NumPy scalars -> Python, full float precision."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return NA if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """Write dict rows atomically. ``fields``: the columns in order (keys outside it are left out); None: the union
    of the rows' keys in first-seen order. Missing keys are empty cells."""
    from moegrok.rundir import write_text

    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: cell(r.get(k)) for k in fields})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buf.getvalue())
    return path


def fmt(v: Any, spec: str = ".3f") -> str:
    """A number for Markdown; strings pass through, None and non-finite numbers are "n/a"."""
    if isinstance(v, str):
        return v
    if v is None or (is_number(v) and not math.isfinite(float(v))):
        return NA
    return format(v, spec)


def fmt_p(p: Any) -> str:
    """A p-value: 3 decimals, scientific below 1e-3."""
    if isinstance(p, str):
        return p
    if p is None or not math.isfinite(float(p)):
        return NA
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend), never to a display."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
