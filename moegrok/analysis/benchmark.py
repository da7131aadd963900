"""The indicator benchmark (`moegrok indicators`): which test-free signals announce a late, sharp transition.

Definitions, fixed before any sweep was looked at (docs/METHOD.md, "Indicator benchmark"):

- transitions: :func:`moegrok.analysis.transition.judge` per (run, domain); its onset is the 10 % point of the gain.
- an indicator's **change point** in a (run, domain): the vertex of the best continuous two-segment piecewise-linear
  fit (ruptures ``Dynp``, cost ``clinear``, exactly one breakpoint, segments of at least 3 checkpoints) of its values
  from ``PRE`` (2) checkpoints before ``t_mem`` to the last checkpoint. The monitor starts once the domain's training
  answers are memorized — which the probe records show without any test.
- **lead** = onset - change point, in checkpoints and in steps (positive: the indicator changed first).
- per indicator, over every late, sharp transition: n, median lead and quartiles, the share of transitions it leads,
  and a two-sided **sign test** on the non-zero leads (binomial, p = 1/2).
- **AUROC**: score = expected direction x (value at ``t_mem + W`` - value at ``t_mem``), W = 3 checkpoints (the
  shortest delay a late transition has, so the window closes before any onset). Positives: (run, domain) with a late,
  sharp transition; negatives: the rule-free twins whose answers are memorized (``auroc_twin``) and every memorized
  domain without a transition, twins included (``auroc_all``). 0.5 is chance.
- **forks** (runs whose ``meta.json`` names a parent) and their parents: across their transitions, the slope and
  Pearson r of the change point's step against the onset's step — does the indicator move with the transition?
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from moegrok.analysis import indicators as ind
from moegrok.analysis.transition import MIN_DELAY, Transition, run_transitions
from moegrok.errors import MoegrokError
from moegrok.tables import fmt, pyplot, write_csv

PRE = 2  # checkpoints before t_mem where the change-point window starts
WINDOW = MIN_DELAY  # AUROC window length in checkpoints
MIN_SEGMENT = 3  # ruptures' clinear cost needs 3 points per segment


def change_point(values: Sequence[float], start: int = 0) -> int | None:
    """Index (into ``values``) of the vertex of the best continuous two-piece linear fit of ``values[start:]``;
    None if fewer than 2 x MIN_SEGMENT finite points remain or the values are constant."""
    import ruptures as rpt

    x = np.asarray(values, dtype=float)[start:]
    if len(x) < 2 * MIN_SEGMENT or not np.isfinite(x).all() or np.ptp(x) == 0:
        return None
    bkps = rpt.Dynp(model="clinear", min_size=MIN_SEGMENT, jump=1).fit(x).predict(n_bkps=1)
    return start + int(bkps[0]) - 1  # clinear's first segment ends at its vertex: the point before the breakpoint


def sign_test(leads: Sequence[float]) -> tuple[float, int, int]:
    """Two-sided sign test on the non-zero leads: (p, positives, n non-zero)."""
    from scipy.stats import binomtest

    x = np.asarray([v for v in leads if np.isfinite(v)], dtype=float)
    x = x[x != 0]
    k, n = int((x > 0).sum()), int(len(x))
    if n == 0:
        return float("nan"), 0, 0
    return float(binomtest(k, n, 0.5).pvalue), k, n


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie) (the Mann-Whitney AUC); NaN if a side is empty."""
    from scipy.stats import mannwhitneyu

    p = np.asarray([v for v in pos if np.isfinite(v)], dtype=float)
    n = np.asarray([v for v in neg if np.isfinite(v)], dtype=float)
    if not len(p) or not len(n):
        return float("nan")
    u = mannwhitneyu(p, n, alternative="two-sided").statistic
    return float(u / (len(p) * len(n)))


@dataclasses.dataclass
class RunInfo:
    name: str
    path: Path
    steps: list[int]
    transitions: dict[str, Transition]
    series: dict[str, dict[str, np.ndarray]]
    twins: set[str]
    parent: dict | None


def twin_domains(meta: Mapping) -> set[str]:
    """The rule-free twins of a run (its corpus summary, else the `<kind>_twin` naming)."""
    doms = (meta.get("corpus") or {}).get("domains") or {}
    out = {d for d, v in doms.items() if isinstance(v, Mapping) and v.get("twin")}
    return out | {d for d in meta.get("domains", []) if d.endswith("_twin")}


def load_runs(paths: Sequence[str | os.PathLike], progress: bool = True) -> list[RunInfo]:
    from moegrok.rundir import RunDir

    runs, names = [], set()
    for p in paths:
        rd = RunDir(p)
        if not rd.steps:
            raise MoegrokError(f"{rd.path}: no complete checkpoint records")
        name = rd.path.name if rd.path.name not in names else str(rd.path)
        names.add(name)
        steps, series = ind.run_indicators(rd, progress=progress)
        # A run too short for a change point still gets its indicator series (series.csv); it has no transition
        # to judge (a monitor's run in progress, a Trainer with a few saves).
        judged = run_transitions(rd) if len(rd.steps) >= 2 * MIN_SEGMENT else {}
        runs.append(RunInfo(name, rd.path, steps, judged, series, twin_domains(rd.meta), rd.meta.get("parent")))
    return runs


def transition_rows(runs: Sequence[RunInfo]) -> list[dict]:
    """One row per (run, domain, indicator): transition, change point, lead, window score."""
    rows = []
    for r in runs:
        for d, t in r.transitions.items():
            for name, spec in ind.REGISTRY.items():
                v = ind.series_for(r.series, name, d)
                cp = None if t.t_mem is None else change_point(v, max(0, t.t_mem - PRE))
                lead = (t.onset - cp) if (t.late_sharp and cp is not None) else None
                score = float("nan")
                if t.t_mem is not None and t.t_mem + WINDOW < len(v):
                    score = spec.direction * float(v[t.t_mem + WINDOW] - v[t.t_mem])
                rows.append({
                    "run": r.name, "domain": d, "twin": d in r.twins, "fork": r.parent is not None,
                    "indicator": name, "t_mem_step": t.t_mem_step, "onset_step": t.onset_step,
                    "late_sharp": t.late_sharp, "gain": t.gain,
                    "change_step": None if cp is None else r.steps[cp],
                    "lead_ckpt": lead, "lead_steps": None if lead is None else r.steps[t.onset] - r.steps[cp],
                    "window_score": score,
                })
    return rows


def _fork_family(runs: Sequence[RunInfo]) -> set[str]:
    """Names of forks and of the runs they were forked from."""
    by_path = {str(r.path.resolve()): r.name for r in runs}
    by_dirname = {r.path.name: r.name for r in runs}
    fam = set()
    for r in runs:
        if r.parent:
            fam.add(r.name)
            where = Path(r.parent.get("run_dir", ""))
            # the parent as recorded (relative to where the fork was started), else by directory name
            parent = by_path.get(str(where.resolve())) or by_dirname.get(where.name)
            if parent:
                fam.add(parent)
    return fam


def summarize(runs: Sequence[RunInfo], rows: Sequence[dict]) -> list[dict]:
    """One row per indicator: the benchmark table."""
    from scipy.stats import pearsonr

    fam = _fork_family(runs)
    out = []
    for name, spec in ind.REGISTRY.items():
        mine = [x for x in rows if x["indicator"] == name]
        trans = [x for x in mine if x["late_sharp"]]
        leads = np.array([x["lead_ckpt"] for x in trans if x["lead_ckpt"] is not None], dtype=float)
        lsteps = np.array([x["lead_steps"] for x in trans if x["lead_steps"] is not None], dtype=float)
        p, k, n_nz = sign_test(leads)
        pos = [x["window_score"] for x in trans]
        memorized = [x for x in mine if not x["late_sharp"] and x["t_mem_step"] is not None]
        neg_twin = [x["window_score"] for x in memorized if x["twin"]]
        neg_all = [x["window_score"] for x in memorized]
        fk = [x for x in trans if x["run"] in fam and x["change_step"] is not None]
        slope = r_fork = float("nan")
        if len(fk) >= 3:
            xs = np.array([x["onset_step"] for x in fk], float)
            ys = np.array([x["change_step"] for x in fk], float)
            if np.ptp(xs) > 0:
                slope = float(np.polyfit(xs, ys, 1)[0])
                if np.ptp(ys) > 0:
                    r_fork = float(pearsonr(xs, ys)[0])
        q = np.percentile(leads, [25, 50, 75]) if len(leads) else [float("nan")] * 3
        out.append({
            "indicator": name, "label": spec.label, "group": spec.group, "direction": spec.direction,
            "n": int(len(leads)), "median_lead_ckpt": float(q[1]), "q25_lead_ckpt": float(q[0]),
            "q75_lead_ckpt": float(q[2]),
            "median_lead_steps": float(np.median(lsteps)) if len(lsteps) else float("nan"),
            "frac_leading": float((leads > 0).mean()) if len(leads) else float("nan"),
            "sign_p": p, "sign_k": k, "sign_n": n_nz,
            "auroc_twin": auroc(pos, neg_twin), "n_pos": len([v for v in pos if np.isfinite(v)]),
            "n_twin": len([v for v in neg_twin if np.isfinite(v)]),
            "auroc_all": auroc(pos, neg_all), "n_neg_all": len([v for v in neg_all if np.isfinite(v)]),
            "fork_n": len(fk), "fork_slope": slope, "fork_r": r_fork,
        })
    return out


# ------------------------------------------------------------------------------------------------ outputs
SUMMARY_FIELDS = ("indicator", "label", "group", "direction", "n", "median_lead_ckpt", "q25_lead_ckpt",
                  "q75_lead_ckpt", "median_lead_steps", "frac_leading", "sign_p", "sign_k", "sign_n", "auroc_twin",
                  "n_pos", "n_twin", "auroc_all", "n_neg_all", "fork_n", "fork_slope", "fork_r")
ROW_FIELDS = ("run", "domain", "twin", "fork", "indicator", "t_mem_step", "onset_step", "late_sharp", "gain",
              "change_step", "lead_ckpt", "lead_steps", "window_score")


def transitions_table(runs: Sequence[tuple[str, Mapping[str, Transition], set[str]]]) -> str:
    """Markdown table of (run name, {domain: Transition}, twin domains) entries."""
    lines = ["| run | domain | memorized at step | gain G | 10 % point (step) | delay (ckpts) | 10-90 % rise | "
             "late and sharp |", "|---|---|---|---|---|---|---|---|"]
    for name, transitions, twins in runs:
        for d, t in transitions.items():
            lines.append(f"| {name} | {d}{' (twin)' if d in twins else ''} | {fmt(t.t_mem_step, 'd')} | "
                         f"{fmt(t.gain, '+.2f')} | {fmt(t.onset_step, 'd')} | {fmt(t.delay, 'd')} | "
                         f"{fmt(t.rise_frac, '.0%')} | {'**yes**' if t.late_sharp else 'no'} |")
    return "\n".join(lines)


def markdown(runs: Sequence[RunInfo], summary: Sequence[dict]) -> str:
    n_tr = sum(t.late_sharp for r in runs for t in r.transitions.values())
    lines = [
        "# Indicator benchmark",
        "",
        f"{len(runs)} runs, {n_tr} late, sharp transitions. Definitions (fixed before the sweep): "
        "docs/METHOD.md of the moegrok repository, \"Indicator benchmark\". "
        "Lead = transition onset (10 % point of the gain) - the indicator's change point (one-breakpoint continuous "
        "piecewise-linear fit from 2 checkpoints before memorization), in checkpoints: positive means the indicator "
        "changed first. AUROC: the indicator's change over the 3 checkpoints after memorization, signed by its "
        "expected direction, separating domains that go on to a late transition from rule-free twins (and from "
        "every memorized domain without one).",
        "",
        "| indicator | expected | n | median lead [q25, q75] (ckpts) | median lead (steps) | leads | sign test p "
        "(k/n) | AUROC vs twins (pos/neg) | AUROC vs all | forks: slope, r (n) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['label']} | {'rises' if s['direction'] > 0 else 'falls'} | {s['n']} | "
            f"{fmt(s['median_lead_ckpt'], '+.1f')} [{fmt(s['q25_lead_ckpt'], '+.1f')}, "
            f"{fmt(s['q75_lead_ckpt'], '+.1f')}] | {fmt(s['median_lead_steps'], '+.0f')} | "
            f"{fmt(s['frac_leading'], '.0%')} | {fmt(s['sign_p'], '.3g')} ({s['sign_k']}/{s['sign_n']}) | "
            f"{fmt(s['auroc_twin'], '.2f')} ({s['n_pos']}/{s['n_twin']}) | {fmt(s['auroc_all'], '.2f')} | "
            f"{fmt(s['fork_slope'], '.2f')}, {fmt(s['fork_r'], '+.2f')} ({s['fork_n']}) |")
    lines += ["", "## Transitions", "",
              transitions_table([(r.name, r.transitions, r.twins) for r in runs]), "",
              "## Figures", "", "![aligned](figures/aligned.png)", "", "![leads](figures/leads.png)", ""]
    return "\n".join(lines)


def _zscore(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, float)
    sd = np.nanstd(v)
    return (v - np.nanmean(v)) / sd if sd > 0 else v * 0.0


def fig_aligned(runs: Sequence[RunInfo], path: Path) -> None:
    """Every indicator's curves aligned on each transition's onset (z-scored per run), the twins in grey."""
    plt = pyplot()
    names = list(ind.REGISTRY)
    cols = 4
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False, sharex=True)
    cmap = plt.get_cmap("tab10")
    pairs = [(r, d, t) for r in runs for d, t in r.transitions.items() if t.late_sharp]
    for ax, name in zip(axes.flat, names):
        for c, (r, d, t) in enumerate(pairs):
            x = np.arange(len(r.steps)) - t.onset
            twin = f"{d}_twin"
            if twin in r.transitions and ind.REGISTRY[name].per_domain:
                ax.plot(x, _zscore(ind.series_for(r.series, name, twin)), color="0.75", lw=1, zorder=1)
            ax.plot(x, _zscore(ind.series_for(r.series, name, d)), color=cmap(c % 10), lw=1.2, zorder=2)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.set_title(ind.REGISTRY[name].label, fontsize=9)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("checkpoints from onset")
    fig.suptitle("Indicators aligned on the transition onset (z-scored per run; grey: the domain's rule-free twin)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig_leads(rows: Sequence[dict], path: Path) -> None:
    """Lead times per indicator (one dot per transition), median marked."""
    plt = pyplot()
    names = list(ind.REGISTRY)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        leads = np.array([x["lead_ckpt"] for x in rows if x["indicator"] == name and x["lead_ckpt"] is not None],
                         float)
        if len(leads):
            ax.scatter(leads + rng.uniform(-0.15, 0.15, len(leads)), np.full(len(leads), i)
                       + rng.uniform(-0.2, 0.2, len(leads)), s=12, alpha=0.7)
            ax.plot([np.median(leads)] * 2, [i - 0.35, i + 0.35], color="k", lw=2)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), [ind.REGISTRY[n].label for n in names], fontsize=8)
    ax.set_xlabel("lead (checkpoints): onset - indicator change point  (> 0: indicator first)")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


SERIES_FIELDS = ["run", "step", "indicator", "domain", "value"]


def series_rows(runs: Sequence[RunInfo]) -> list[dict]:
    """Every indicator's value at every checkpoint: the monitor's own table."""
    return [{"run": r.name, "step": step, "indicator": name, "domain": d, "value": float(v[i])}
            for r in runs for name, by_d in r.series.items() for d, v in by_d.items()
            for i, step in enumerate(r.steps)]


def run_benchmark(paths: Sequence[str | os.PathLike], out: str | os.PathLike, progress: bool = True,
                  figures: bool = True) -> tuple[list[dict], list[dict]]:
    """Write ``indicators.csv`` (summary), ``leads.csv`` (every run x domain x indicator), ``series.csv`` (every
    indicator at every checkpoint), ``indicators.md`` and ``figures/`` to ``out``; returns (summary, rows)."""
    if not paths:
        raise MoegrokError("moegrok indicators: give at least one run directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(paths, progress=progress)
    rows = transition_rows(runs)
    summary = summarize(runs, rows)
    write_csv(out / "indicators.csv", summary, SUMMARY_FIELDS)
    write_csv(out / "leads.csv", rows, ROW_FIELDS)
    write_csv(out / "series.csv", series_rows(runs), SERIES_FIELDS)
    from moegrok.rundir import write_text

    short = [r.name for r in runs if len(r.steps) < 2 * MIN_SEGMENT]
    note = (f"\n{', '.join(short)}: fewer than {2 * MIN_SEGMENT} checkpoints, too few for a change point; their "
            "indicator values are in series.csv, no transition of theirs is judged.\n") if short else ""
    write_text(out / "indicators.md", markdown(runs, summary) + note)
    if figures:
        fig_aligned(runs, out / "figures" / "aligned.png")
        fig_leads(rows, out / "figures" / "leads.png")
    return summary, rows


def register(sub) -> None:
    p = sub.add_parser("indicators", help="benchmark test-free indicators against late, sharp transitions",
                       description="For every (run, domain) with a late, sharp transition and every registered "
                                   "indicator: the indicator's change point and its lead over the transition; per "
                                   "indicator the median lead, a sign test and an AUROC against the rule-free "
                                   "twins (definitions: docs/METHOD.md).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory (indicators.csv, leads.csv, indicators.md, "
                                                "figures/)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    def run(args) -> int:
        summary, _ = run_benchmark(args.run_dirs, args.out, progress=not args.no_progress,
                                   figures=not args.no_figures)
        print(f"wrote {Path(args.out) / 'indicators.md'} ({len(summary)} indicators)")
        return 0

    p.set_defaults(func=run)
