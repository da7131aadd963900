"""Across runs: the metrics study's tables (docs/findings.md) from analysed run directories.

Reads only what `moegrok analyze` wrote (``analysis/summary.json``, ``lag.csv``, ``correlations.csv``,
``metrics.csv``) for runs grouped by configuration (seeds of one config form a group). Nothing is recomputed here, so
the tables can always be traced back to each run's own report.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from moegrok.errors import MoegrokError

KINDS = (("raw", "raw"), ("diff", "first differences"), ("partial", "partial on step"))


def study_metrics() -> list[str]:
    """The multi-run table's metrics: the analysis registry's entries marked ``study`` (run_metrics.METRICS)."""
    from moegrok.analysis.run_metrics import METRICS

    return [m.name for m in METRICS if m.study]

TARGET_R = 0.8  # the paper's |r| the project is after (issue #6): distance <= -0.8, consistency >= +0.8, p < 0.05


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise MoegrokError(f"{path}: missing; run `moegrok analyze {path.parent.parent}` first") from None


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def load_analysis(run_dir: str | os.PathLike) -> dict:
    """One analysed run: summary, lag pairs, correlation rows and the memorized-group diagnostics."""
    a = Path(run_dir) / "analysis"
    try:
        summary = json.loads((a / "summary.json").read_text())
    except FileNotFoundError:
        raise MoegrokError(f"{a / 'summary.json'}: missing; run `moegrok analyze {run_dir}` first") from None
    return {"path": Path(run_dir), "summary": summary, "lag": _read_csv(a / "lag.csv"),
            "corr": _read_csv(a / "correlations.csv"), "metrics": _read_csv(a / "metrics.csv")}


def lag_rows(runs: Mapping[str, Sequence[dict]], domains: Sequence[str], min_lag: int = 2) -> list[dict]:
    """Per config, seed and domain: matched pairs, the longest lag (checkpoints), and whether a pair reaches
    `min_lag` (the issue's acceptance: Train@p -> Test@q with q >= p + 2; p is already flat by METHOD §2)."""
    out = []
    for label, group in runs.items():
        for r in group:
            for d in domains:
                pairs = [p for p in r["lag"] if p["domain"] == d]
                lags = [int(p["lag_checkpoints"]) for p in pairs]
                dom = r["summary"]["domains"].get(d, {})
                out.append({"config": label, "run": r["path"].name, "domain": d, "pairs": len(pairs),
                            "max_lag": max(lags) if lags else None,
                            "pairs_ge": sum(x >= min_lag for x in lags), "memorized": dom.get("memorized"),
                            "generalized": dom.get("generalized"), "test_items": dom.get("test_items"),
                            "ok": any(x >= min_lag for x in lags)})
    return out


def correlation_summary(runs: Mapping[str, Sequence[dict]], domains: Sequence[str], window: str = "all") -> list[dict]:
    """Per config x domain x metric x kind: Pearson r over seeds (mean, min, max), how many seeds have adjusted
    p < 0.05, Spearman mean, and the in-run or run control's Pearson r (mean) when present."""
    out = []
    for label, group in runs.items():
        for d in domains:
            for m in study_metrics():
                for kind, _ in KINDS:
                    rows = [next((c for c in r["corr"] if (c["domain"], c["window"], c["metric"], c["kind"])
                                  == (d, window, m, kind)), None) for r in group]
                    rs = np.array([_float(c["pearson_r"]) if c else math.nan for c in rows])
                    ps = np.array([_float(c["pearson_p_adj"]) if c else math.nan for c in rows])
                    rho = np.array([_float(c["spearman_r"]) if c else math.nan for c in rows])
                    ctl = np.array([_float(c.get("control_pearson_r")) if c else math.nan for c in rows])
                    ok = np.isfinite(rs)
                    ns = [int(c["n"]) for c in rows if c and c["n"]]
                    out.append({"config": label, "domain": d, "metric": m, "kind": kind, "seeds": int(ok.sum()),
                                "n": f"{min(ns)}–{max(ns)}" if ns and min(ns) != max(ns) else (str(ns[0]) if ns else ""),
                                "r_mean": float(rs[ok].mean()) if ok.any() else math.nan,
                                "r_min": float(rs[ok].min()) if ok.any() else math.nan,
                                "r_max": float(rs[ok].max()) if ok.any() else math.nan,
                                "sig": int(((ps < 0.05) & ok).sum()),
                                "rho_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else math.nan,
                                "control_r_mean": float(np.nanmean(ctl)) if np.isfinite(ctl).any() else math.nan,
                                "notes": sorted({c["note"] for c in rows if c and c["note"]})})
    return out


def saturation_rows(runs: Mapping[str, Sequence[dict]], domains: Sequence[str]) -> list[dict]:
    """Memorized groups at the last checkpoint: experts kept per layer by the τ rule, top-1 weight, entropy."""
    out = []
    for label, group in runs.items():
        for d in domains:
            vals = {"kept_per_layer": [], "top1_weight": [], "entropy": [], "path_text": []}
            for r in group:
                last = max((int(x["step"]) for x in r["metrics"]), default=None)
                for x in r["metrics"]:
                    if x["domain"] == d and x["group"] == "memorized" and int(x["step"]) == last:
                        for k in vals:
                            vals[k].append(_float(x[k]))
            out.append({"config": label, "domain": d,
                        **{k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
                           for k, v in ((k, np.array(v, float)) for k, v in vals.items())}})
    return out


def target_reached(corr: Sequence[dict], control_domains: Sequence[str] = ()) -> dict[str, list[str]]:
    """Config -> domains where, in every seed (mean r and each seed's adjusted p), distance (text or token) is
    <= -0.8 and consistency S >= +0.8, raw and first-differenced. Control domains never count."""
    hit: dict[str, list[str]] = {}
    by = {(c["config"], c["domain"], c["metric"], c["kind"]): c for c in corr}

    def good(label, d, metric, sign):
        cells = [by.get((label, d, metric, k)) for k in ("raw", "diff")]
        return all(c and c["seeds"] and c["sig"] == c["seeds"]
                   and sign * (c["r_max"] if sign < 0 else c["r_min"]) >= TARGET_R for c in cells)

    for label in dict.fromkeys(c["config"] for c in corr):
        hit[label] = [d for d in dict.fromkeys(c["domain"] for c in corr if c["config"] == label)
                      if d not in control_domains
                      and (good(label, d, "pathway distance (text)", -1) or good(label, d, "pathway distance (token)", -1))
                      and good(label, d, "consistency S", +1)]
    return hit


def _f(v: float, spec: str = "+.2f") -> str:
    return "—" if v is None or not np.isfinite(v) else format(v, spec)


def markdown(runs: Mapping[str, Sequence[dict]], domains: Sequence[str], control_domains: Sequence[str] = ()) -> str:
    """The metrics study as Markdown: lag acceptance, correlations (raw / first differences / partial on step) with
    seed spread and significance, saturation, and whether the target was reached."""
    lines = ["## Grokking lag (Train@p → Test@q, q ≥ p + 2 checkpoints)", "",
             "| config | run | domain | memorized | generalized / items | matched pairs | pairs with lag ≥ 2 | "
             "longest lag |", "|---" * 8 + "|"]
    for r in lag_rows(runs, domains):
        lines.append(f"| {r['config']} | {r['run']} | {r['domain']} | {r['memorized']} | {r['generalized']} / "
                     f"{r['test_items']} | {r['pairs']} | {r['pairs_ge']} | "
                     f"{'—' if r['max_lag'] is None else r['max_lag']} |")
    corr = correlation_summary(runs, domains)
    lines += ["", "## Correlation with test accuracy, all checkpoints", "",
              "Pearson r: mean over seeds [min, max]; sig = seeds with Benjamini-Hochberg-adjusted p < 0.05; "
              "control = the in-run rule-free twin's series against the same accuracy (mean r). Complexity "
              "C = 1 − S has r(C) = −r(S) with the same n and p, so it is not repeated; each run's "
              "`analysis/correlations.csv` lists it, and the moving-average (window 3) training loss.", ""]
    for label in runs:
        lines += [f"### {label}", "", "| domain | metric | n | raw r [min, max] (sig) | first diff r (sig) | "
                  "partial on step r (sig) | Spearman ρ raw | control raw r |", "|---" * 8 + "|"]
        for d in domains:
            if d in control_domains:
                continue
            for m in study_metrics():
                cells = {c["kind"]: c for c in corr if (c["config"], c["domain"], c["metric"]) == (label, d, m)}
                raw = cells.get("raw")
                if raw is None or not raw["seeds"]:
                    why = "; ".join(raw["notes"])[:120] if raw else ""
                    lines.append(f"| {d} | {m} | | n/a {why} | | | | |")
                    continue
                def cell(c):
                    return f"{_f(c['r_mean'])} [{_f(c['r_min'])}, {_f(c['r_max'])}] ({c['sig']}/{c['seeds']})"
                lines.append(f"| {d} | {m} | {raw['n']} | {cell(raw)} | {cell(cells['diff'])} | "
                             f"{cell(cells['partial'])} | {_f(raw['rho_mean'])} | {_f(raw['control_r_mean'])} |")
        lines.append("")
    lines += ["## Saturation of the memorized groups' pathways (last checkpoint, mean over seeds)", "",
              "| config | domain | experts kept per layer (τ) | top-1 weight | entropy | text distance |",
              "|---" * 6 + "|"]
    for s in saturation_rows(runs, domains):
        lines.append(f"| {s['config']} | {s['domain']} | {_f(s['kept_per_layer'], '.2f')} | "
                     f"{_f(s['top1_weight'], '.3f')} | {_f(s['entropy'], '.3f')} | {_f(s['path_text'], '.1f')} |")
    hit = target_reached(corr, control_domains)
    lines += ["", "## Target (distance ≤ −0.8 and consistency S ≥ +0.8, raw and first differences, every seed "
              "significant, in ≥ 2 domains)", ""]
    for label, ds in hit.items():
        lines.append(f"- {label}: " + (f"reached in {', '.join(ds)}" + ("" if len(ds) >= 2 else
                                       " (fewer than 2 domains: not reached)") if ds else "not reached"))
    return "\n".join(lines) + "\n"
