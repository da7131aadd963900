"""`moegrok run CONFIG --run-dir DIR`: the whole study — train (one epoch, probe records), analyze, theory on the
logged routing, and one report. Every stage is resumable: training resumes from its last checkpoint, and the
analysis and theory stages are recomputed from the run directory (they are cheap next to training)."""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from moegrok import rundir
from moegrok.errors import MoegrokError

STAGES = ("train", "analyze", "theory", "report")

# The paper's figures and table, and where this run's counterparts live.
PAPER_MAP = [
    ("Figure 1", "memorized samples vs test accuracy per domain", "analysis/figures/memorized_vs_accuracy.png"),
    ("Figure 2", "Train@p → Test@q: generalization lags memorization", "analysis/figures/lag.png"),
    ("Figure 4", "pathway distance vs training loss per group", "analysis/figures/distance_vs_loss.png"),
    ("Figure 5", "layer-wise pathway distance", "analysis/figures/layerwise_distance.png"),
    ("Figure 6", "pathway consistency vs training loss", "analysis/figures/consistency_vs_loss.png"),
    ("Table 1", "correlations of each metric with test accuracy", "analysis/correlations.md"),
]


def _section(raw: dict, name: str, cls):
    from moegrok.training.config import dataclass_from_dict

    return dataclass_from_dict(cls, raw.get(name), name)


def _stage(i: int, name: str, what: str) -> float:
    print(f"[{i}/{len(STAGES)}] {name}: {what}", flush=True)
    return time.perf_counter()


def training_figure(run_dir: Path, out: Path) -> Path | None:
    """Training loss and per-domain test accuracy against the step: the run at a glance."""
    from moegrok.rundir import RunDir

    rd = RunDir(run_dir)
    metrics = rd.metrics()
    if not metrics or not rd.steps:
        return None
    from moegrok.tables import pyplot

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([m["step"] for m in metrics], [m["lm_loss"] for m in metrics], lw=1)
    ax1.set(xlabel="training step", ylabel="training LM loss (batch)", title="Training loss")
    steps = rd.steps
    evals = [rd.eval(s) for s in steps]
    for d in evals[-1].accuracy:
        ax2.plot(steps, [e.accuracy.get(d, float("nan")) for e in evals], marker="o", ms=3, label=d)
    ax2.set(xlabel="training step", ylabel="held-out test accuracy", title="Test accuracy per domain", ylim=(0, 1))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def transitions_section(rd) -> list[str]:
    """Each domain judged by the late-and-sharp definition (docs/METHOD.md §9)."""
    from moegrok.analysis.benchmark import transitions_table, twin_domains
    from moegrok.analysis.transition import run_transitions

    if not rd.steps:
        return []
    tr = run_transitions(rd)
    twins = twin_domains(rd.meta)
    late = [d for d, t in tr.items() if t.late_sharp]
    twin_gen = [d for d in twins if d in tr and tr[d].gain > 0.1]
    return ["## Late, sharp transitions (METHOD §9)", "",
            f"Late and sharp in: {', '.join(late) if late else 'no domain'}."
            + (f" Rule-free twins that gained > 0.1 accuracy after memorizing (should not happen): "
               f"{', '.join(twin_gen)}." if twin_gen else ""), "",
            *(f"- {t.describe()}" for t in tr.values()), "", transitions_table([(rd.path.name, tr, twins)]), ""]


def _reroot(markdown: str, prefix: str) -> str:
    """Make a sub-report's relative links and images resolve from the run directory."""
    return re.sub(r"\]\((?!https?://|/)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)


def _demote(markdown: str) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def write_report(run_dir: Path, timings: dict[str, float]) -> Path:
    from moegrok.rundir import RunDir, method_link

    rd = RunDir(run_dir)
    cfg = rd.config
    m, t = cfg.get("model", {}), cfg.get("train", {})
    fig = training_figure(run_dir, run_dir / "figures" / "training.png")
    lines = [f"# moegrok study: `{run_dir}`", "",
             f"Definitions (\"METHOD §N\"): {method_link(run_dir)}.", ""]
    lines += [f"Model: {m.get('num_hidden_layers')} layers, d = {m.get('hidden_size')}, {m.get('num_experts')} "
              f"experts, top-{m.get('num_experts_per_tok')}. One epoch of {rd.meta.get('total_steps')} steps over "
              f"domains {', '.join(rd.meta.get('domains', []))}; AdamW lr {t.get('learning_rate')}, weight decay "
              f"{t.get('weight_decay')}; {len(rd.steps)} checkpoints with probe records.", ""]
    if timings:
        lines += ["Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".", ""]
    if fig is not None:
        lines += ["![Training loss and test accuracy](figures/training.png)", "",
                  "*Training loss and held-out accuracy per domain.* A domain whose accuracy keeps rising after "
                  "the loss has flattened is the paper's local grokking.", ""]
    lines += transitions_section(rd)
    lines += ["## Where the paper's figures are", "", "| paper | what | this run |", "|---|---|---|"]
    lines += [f"| {a} | {b} | [{c}]({c}) |" for a, b, c in PAPER_MAP]
    lines.append("")
    for title, sub in (("Analysis", "analysis/report.md"), ("Theory", "theory/theory.md")):
        p = run_dir / sub
        lines += [f"## {title}", ""]
        if p.exists():
            body = p.read_text()
            body = re.sub(r"\A# [^\n]*\n", "", body)  # the sub-report's own title
            lines += [_demote(_reroot(body, str(Path(sub).parent))), ""]
        else:
            lines += [f"n/a: {sub} was not produced", ""]
    out = run_dir / "report.md"
    rundir.write_text(out, "\n".join(lines))
    return out


def run_study(config: str | Path, run_dir: str | Path, overrides: list[str] = (), *, progress: bool = True) -> Path:
    from moegrok.analysis.report import analyze
    from moegrok.analysis.run_metrics import AnalysisConfig
    from moegrok.theory.fromrun import RunTheoryConfig
    from moegrok.theory.run_report import run_theory
    from moegrok.training.config import load_config_file, request_host_devices
    from moegrok.training.train import RunConfig, train

    raw = load_config_file(config, list(overrides))
    cfg = RunConfig.from_dict(raw)
    request_host_devices(cfg.train.mesh_devices)
    acfg = _section(raw, "analysis", AnalysisConfig)
    tcfg = _section(raw, "theory", RunTheoryConfig)
    if not progress:
        import dataclasses

        acfg = dataclasses.replace(acfg, progress=False)
    run_dir = Path(run_dir)
    timings: dict[str, float] = {}
    t0 = _stage(1, "train", f"one epoch into {run_dir} (resumes if interrupted)")
    train(cfg, run_dir, progress=progress)
    timings["train"] = time.perf_counter() - t0
    t0 = _stage(2, "analyze", "memorization, generalization, pathway metrics, correlations")
    analyze(run_dir, acfg)
    timings["analyze"] = time.perf_counter() - t0
    t0 = _stage(3, "theory", "routing kernel and effective dimension per checkpoint")
    run_theory(run_dir, run_dir / "theory", tcfg, progress=progress)
    timings["theory"] = time.perf_counter() - t0
    _stage(4, "report", "report.md")
    out = write_report(run_dir, timings)
    rundir.write_text(run_dir / "study_timings.json", json.dumps(timings, indent=1))
    print(f"report: {out}")
    return out


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole study: train, analyze, theory, report (resumable)",
                       description="Train one epoch with probe records, analyze, run the theory on the logged "
                                   "routing and write RUN_DIR/report.md. Re-running resumes.")
    p.add_argument("config", help="YAML config (sections model / data / train, optional analysis / theory), or the "
                                   "name of a packaged config (default, tiny, ...)")
    p.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from moegrok.training.config import resolve_config

    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    if not resolve_config(args.config).is_file():
        raise MoegrokError(f"{args.config}: config file not found")
    run_study(args.config, run_dir, args.overrides, progress=not args.no_progress)
    return 0
