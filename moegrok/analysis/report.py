"""`moegrok analyze`: every metric of METHOD §2-§6 for one run directory, written to ``RUN_DIR/analysis/``.

:func:`analyze` is the entry point: :func:`moegrok.analysis.run_metrics.compute_analysis` (optionally for a control
run too), then this module writes ``metrics.csv``, ``layerwise.csv``, ``samples.csv``, ``test_items.csv``,
``lag.csv``, ``correlations.csv`` / ``.md``, ``summary.json``, the figures (:mod:`moegrok.analysis.figures`) and
``report.md``. Every n/a stays an "n/a: reason" in the outputs, never a bare NaN.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from moegrok.analysis import correlations as corr_mod
from moegrok.rundir import method_link, write_text
from moegrok.tables import write_csv
from moegrok.analysis.figures import write_figures
from moegrok.analysis.run_metrics import (METRICS, NAN, PATHWAY_FIELDS, Analysis, AnalysisConfig, RunData, cell_text,
                                          computed_metrics,
                                          compute_analysis, in_run_controls)


def analyze(run_dir: str | os.PathLike, cfg: AnalysisConfig = AnalysisConfig(),
            control_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Run the whole analysis and write it; returns the output directory (default RUN_DIR/analysis)."""
    ctl = None
    if control_dir is not None:
        ctl = compute_analysis(control_dir, dataclasses.replace(cfg, figures=False))
    a = compute_analysis(run_dir, cfg, ctl)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    return write_outputs(a, out, control_dir)


# ----------------------------------------------------------------------------------------------------------------
# Writing: CSV, Markdown, JSON

METRIC_FIELDS = ("step", "checkpoint", "domain", "group", "n_samples", "loss_mean", "S_mean", "S_n_na", "C_mean",
                 "R_mean") + PATHWAY_FIELDS + ("note",)


def metric_fields() -> tuple[str, ...]:
    """metrics.csv's columns: the built-in ones, then every registered metric's own (run_metrics.register_metric)."""
    return METRIC_FIELDS[:-1] + tuple(m.column for m in computed_metrics()) + METRIC_FIELDS[-1:]


def _step_of(data: RunData, idx: int) -> str:
    return "never" if idx < 0 else str(data.steps[idx])


def summary_dict(a: Analysis) -> dict:
    d = a.data
    return {
        "run_dir": str(d.run.path), "finished": d.run.finished, "steps": d.steps,
        "num_layers": d.num_layers, "num_experts": d.num_experts, "config": dataclasses.asdict(a.config),
        "embedding": a.embedding, "correction": corr_mod.CORRECTION_NAMES[a.config.correction],
        "consistency_note": a.consistency_note, "notes": a.notes,
        "domains": {
            dr.domain: {
                "samples": int(dr.sample_idx.size),
                "epsilon": None if dr.epsilon is None else dr.epsilon.epsilon,
                "memorized_share": None if dr.epsilon is None else dr.epsilon.share,
                "epsilon_in_target": None if dr.epsilon is None else dr.epsilon.in_target,
                "epsilon_grid": None if dr.epsilon is None else [list(g) for g in dr.epsilon.grid],
                "memorized": int((dr.t_star >= 0).sum()), "memorization_note": dr.mem_note,
                "test_items": 0 if dr.t_hash is None else int(dr.t_hash.size),
                "generalized": 0 if dr.t_hash is None else int((dr.t_hash >= 0).sum()),
                "generalization_note": dr.gen_note, "pairing_note": dr.pair_note,
                "lags": [dataclasses.asdict(p) | {"lag_steps": p.lag_steps} for p in dr.pairs],
                "rise_window": a.windows[dr.domain]["rise_why"],
            } for dr in a.domains},
    }


def write_outputs(a: Analysis, out: Path, control_dir=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    d = a.data
    write_csv(out / "metrics.csv", a.rows, metric_fields())
    write_csv(out / "layerwise.csv", a.layer_rows, ("step", "checkpoint", "domain", "group", "layer", "distance",
                                                    "kept", "top1_weight", "entropy"))
    samples = [{"sample_id": int(d.sample_ids[i]), "domain": dr.domain, "t_star_step": _step_of(d, int(t)),
                "epsilon": "" if dr.epsilon is None else dr.epsilon.epsilon}
               for dr in a.domains for i, t in zip(dr.sample_idx, dr.t_star)]
    write_csv(out / "samples.csv", samples, ("sample_id", "domain", "t_star_step", "epsilon"))
    items = [{"test_id": tid, "domain": dr.domain, "t_hash_step": _step_of(d, int(t))}
             for dr in a.domains if dr.t_hash is not None for tid, t in zip(d.test_ids[dr.domain], dr.t_hash)]
    write_csv(out / "test_items.csv", items, ("test_id", "domain", "t_hash_step"))
    lag_rows = [dataclasses.asdict(p) | {"lag_steps": p.lag_steps, "lag_checkpoints": p.lag_checkpoints,
                                        "embedding": a.embedding} for dr in a.domains for p in dr.pairs]
    write_csv(out / "lag.csv", lag_rows, ("domain", "train_step", "test_step", "lag_steps", "lag_checkpoints",
                                          "train_index", "test_index", "similarity", "n_train", "n_test",
                                          "embedding"))
    write_csv(out / "correlations.csv", [corr_mod.row_dict(r) for r in a.correlations], corr_mod.CSV_FIELDS)
    write_text(out / "correlations.md", correlation_markdown(a, control_dir))
    write_text(out / "summary.json", json.dumps(summary_dict(a), indent=1, default=_json_default))
    figs = write_figures(a, out / "figures") if a.config.figures else {}
    write_text(out / "report.md", report_markdown(a, figs, control_dir, out))
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


TABLES = (("all", "raw", "all checkpoints"), ("rise", "raw", "from the start of the sustained accuracy rise"),
          ("all", "diff", "first differences, all checkpoints"),
          ("all", "partial", "partial correlation controlling for the training step, all checkpoints"))


def correlation_markdown(a: Analysis, control_dir=None) -> str:
    method = corr_mod.CORRECTION_NAMES[a.config.correction]
    order = [m.name for m in METRICS]
    parts = [f"Correlation of each per-checkpoint metric with the domain's test accuracy. r = Pearson, ρ = Spearman, "
             f"p two-sided, 'adj' = {method}-adjusted within each table (Pearson and Spearman separately), n = "
             "checkpoints used. Metrics are over the samples memorized before the last checkpoint unless named "
             "otherwise."]
    if control_dir is None and any(r.control is not None for r in a.correlations):
        pairs = in_run_controls(a.data.domains, a.config.control_domains)
        parts.append("⚠ same in control: the in-run control domain (" + ", ".join(
            f"{c} for {d}" for d, c in pairs.items()) + "), a rule-free twin that memorizes without generalizing, "
            "correlates with the domain's accuracy with the same sign, at least half the strength and |r| >= 0.3 "
            "(Pearson): the metric tracks training time.")
    if control_dir is not None:
        parts.append(f"⚠ same in control: the control run ({control_dir}) correlates with this run's accuracy with "
                     "the same sign, at least half the strength and |r| >= 0.3 (Pearson): the metric tracks training "
                     "time.")
    for w, k, title in TABLES:
        parts.append(f"### {title}\n\n{corr_mod.markdown_table(a.correlations, w, k, order)}")
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# report.md

def _distance_table(a: Analysis) -> str:
    """First and last checkpoint of every group's distances, with the saturation diagnostics beside them. An n/a
    cell shows a footnote number; the reasons are listed under the table."""
    cols = ("n_samples", "path_text", "path_text_norm", "path_expert", "path_token", "kept_per_layer",
            "top1_weight", "entropy", "saturated", "loss_mean", "R_mean", "S_mean")
    lines = ["| domain | group | step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    first, last = a.data.steps[0], a.data.steps[-1]
    reasons: dict[str, int] = {}

    def cell(v) -> str:
        if isinstance(v, str) and v.startswith(("n/a", "not computed")):
            return f"n/a [{reasons.setdefault(v, len(reasons) + 1)}]"
        return "" if v == "" else cell_text(v)

    for r in a.rows:
        if r["group"] == "domain" or r["step"] not in (first, last):
            continue
        lines.append(f"| {r['domain']} | {r['group']} | {r['step']} | " + " | ".join(cell(r.get(c, "")) for c in cols)
                     + " |")
    lines += [""] + [f"[{k}] {why}  " for why, k in reasons.items()]
    return "\n".join(lines)


def report_markdown(a: Analysis, figs: Mapping[str, tuple[Path, str, str]], control_dir=None,
                    out_dir: Path | None = None) -> str:
    d = a.data
    c = a.config
    where = out_dir if out_dir is not None else d.run.path / "analysis"  # the link is relative to the report
    out = [f"# moegrok analysis of `{d.run.path}`", "",
           f"\"METHOD §N\" refers to section N of the method document, {method_link(where)}.", ""]
    status = "finished" if d.run.finished else "**not finished (provisional)**"
    out.append(f"Run {status}; {len(d.steps)} checkpoints (steps {d.steps[0]}–{d.steps[-1]}); {d.num_layers} MoE "
               f"layer(s) × {d.num_experts} experts; domains: {', '.join(d.domains)}.")
    eps = f"fixed at {c.epsilon}" if c.epsilon is not None else "searched per domain (METHOD §2)"
    which = ("mean NLL over the whole sample (METHOD §2)" if c.memorization_loss == "sample" else
             "mean NLL over the sample's answer tokens (`memorization_loss: answer`, beyond METHOD §2)")
    out.append(f"Settings: memorization loss = {which}, τ = {c.tau}, δ = {c.delta}, ε {eps}, "
               f"embedding for pairing: **{a.embedding}**, p-value correction: "
               f"{corr_mod.CORRECTION_NAMES[c.correction]}.")
    if a.notes:
        out += ["", "**Notes**", ""] + [f"- {n}" for n in a.notes]
    out += ["", "## Memorization (METHOD §2)", "",
            "| domain | samples | ε | memorized share | in 20–25% | memorized | groups | note |", "|---" * 8 + "|"]
    for dr in a.domains:
        e = dr.epsilon
        out.append(f"| {dr.domain} | {dr.sample_idx.size} | {cell_text(e.epsilon if e else NAN)} | "
                   f"{cell_text(e.share if e else NAN)} | {'' if e is None else ('yes' if e.in_target else 'no')} | "
                   f"{int((dr.t_star >= 0).sum())} | {len(np.unique(dr.t_star[dr.t_star >= 0]))} | "
                   f"{dr.mem_note or ''} |")
    out += ["", "## Generalization and grokking lag (METHOD §3)", "",
            "| domain | test items | generalized | Test groups | matched pairs | note |", "|---" * 6 + "|"]
    for dr in a.domains:
        n_items = 0 if dr.t_hash is None else dr.t_hash.size
        n_gen = 0 if dr.t_hash is None else int((dr.t_hash >= 0).sum())
        n_groups = 0 if dr.t_hash is None else len(np.unique(dr.t_hash[dr.t_hash >= 0]))
        out.append(f"| {dr.domain} | {n_items} | {n_gen} | {n_groups} | {len(dr.pairs)} | "
                   f"{dr.gen_note or dr.pair_note or ''} |")
    pairs = [p for dr in a.domains for p in dr.pairs]
    if pairs:
        out += ["", "| domain | Train@p | Test@q | lag (steps) | lag (checkpoints) | similarity | n train | n test |",
                "|---" * 8 + "|"]
        out += [f"| {p.domain} | {p.train_step} | {p.test_step} | {p.lag_steps} | {p.lag_checkpoints} | "
                f"{p.similarity:.3f} | {p.n_train} | {p.n_test} |" for p in pairs]
    for name in ("memorized_vs_accuracy.png", "lag.png"):
        out += _fig_md(figs, name)
    out += ["", "## Pathways (METHOD §4)", "",
            "Mean pairwise Levenshtein distance over memorized samples (text encoding; normalised; expert symbols; "
            "token-level), first and last checkpoint, with the saturation diagnostics next to it (experts kept per "
            "layer by the τ rule, top-expert weight, routing entropy). Full per-checkpoint values: `metrics.csv`, "
            "layer-wise: `layerwise.csv`.", "", _distance_table(a)]
    for name in ("distance_vs_loss.png", "layerwise_distance.png"):
        out += _fig_md(figs, name)
    out += ["", "## Consistency (METHOD §5)", "",
            a.consistency_note or "S, C and R defined for every memorized sample-checkpoint."]
    out += _fig_md(figs, "consistency_vs_loss.png")
    out += ["", "## Correlations with test accuracy (METHOD §6)", "",
            f"Sustained rise: the window starts at the last checkpoint up to the accuracy peak whose accuracy is at "
            f"most base + {c.rise_fraction} × (peak − base), base = the lowest accuracy before the peak; no window "
            f"if the rise is under {c.min_rise}."]
    out += [f"- {dm}: {w['rise_why']}" for dm, w in a.windows.items()]
    out += ["", correlation_markdown(a, control_dir)]
    out += ["## Files", "", "`metrics.csv` (checkpoint × domain × group), `layerwise.csv`, `samples.csv` (t* per "
            "probe sample), `test_items.csv` (t# per test item), `lag.csv`, `correlations.csv` / `.md`, "
            "`summary.json`, `figures/`."]
    return "\n".join(out) + "\n"


def _fig_md(figs, name: str) -> list[str]:
    if name not in figs:
        return []
    path, reading, title = figs[name]
    return ["", f"![{title}](figures/{name})", "", f"*{title}.* {reading}"]
