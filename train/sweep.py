"""Launch a sweep: seeds x configurations (named variants and/or knob values) + forks, one `moegrok train` per run,
resumable; optionally `moegrok analyze` each finished run.

Each run is `OUT/<name>`; a finished run (meta.json `finished: true`) is skipped, an unfinished one resumes from its
last checkpoint, and an analysed one (analysis/summary.json) is not analysed again, so re-running the same command
after an interruption completes the sweep. Runs go one at a time, each on `--mesh-data` CPU devices (on a 2-core
machine 2 is fastest).

    # the indicator benchmark: seeds x weight decay + forks, then `python analysis/indicator_benchmark.py OUT`
    python train/sweep.py configs/default.yaml --out runs/grok_sweep --seeds 0 1 2 \\
        --knob train.weight_decay=2.0,3.0 --fork "weight_decay3.0_s0@1800:train.weight_decay=6.0"
    # the metrics study: named configurations x seeds, analysed, then `python analysis/metrics_study.py --sweep OUT`
    python train/sweep.py configs/default.yaml --out runs/study --seeds 0 1 2 --analyze \\
        --variant default: --variant e16:model.num_experts=16 --variant k4:model.num_experts_per_tok=4

Run names: `<variant>[-<knob key's last part><value> ...]_s<seed>` (e.g. `e16_s1`, `weight_decay3.0_s1`); a fork is
named after its parent, the step and its overrides (`weight_decay3.0_s0-f1800-weight_decay6.0`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path


def _configurations(args) -> list[tuple[str, list[str]]]:
    """(name without seed, overrides): every variant x every combination of knob values."""
    variants = []
    for spec in args.variant:
        name, sep, sets = spec.partition(":")
        if not sep or not name:
            sys.exit(f"--variant {spec!r}: expected NAME:key=value[,key=value] (NAME: for the config as it is)")
        variants.append((name, [s for s in sets.split(",") if s]))
    knobs = []
    for spec in args.knob:
        key, sep, values = spec.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not key or not vals:
            sys.exit(f"--knob {spec!r}: expected KEY=V1,V2,...")
        knobs.append([(f"{key.split('.')[-1]}{v}", f"{key}={v}") for v in vals])
    out = []
    for (vname, vsets), combo in itertools.product(variants or [("", [])], itertools.product(*knobs)):
        name = "-".join([vname] * bool(vname) + [n for n, _ in combo])
        out.append((name, vsets + [o for _, o in combo]))
    return out


def plan(args) -> list[tuple[str, list[str]]]:
    """(run name, `moegrok train` arguments after the config) for every run, parents before forks."""
    runs = []
    for name, sets in _configurations(args):
        for seed in args.seeds:
            runs.append((f"{name}_s{seed}" if name else f"s{seed}", sets + [f"data.seed={seed}", f"train.seed={seed}"]))
    base = dict(runs)
    for spec in args.fork:
        try:
            where, sets = spec.split(":", 1)
            parent, step = where.rsplit("@", 1)
            int(step)
        except ValueError:
            sys.exit(f"--fork {spec!r}: expected PARENT@STEP:key=value[,key=value]")
        if parent not in base:
            sys.exit(f"--fork {spec!r}: no run named {parent!r} in this sweep (runs: {sorted(base)})")
        sets = [s for s in sets.split(",") if s]
        name = f"{parent}-f{step}-" + "-".join(s.split("=")[0].split(".")[-1] + s.split("=")[1] for s in sets)
        runs.append((name, base[parent] + sets + ["--fork", f"{Path(args.out) / parent}@{step}"]))
    return runs


def check_configs(config: str, runs: list[tuple[str, list[str]]]) -> str | None:
    """The first run whose config `moegrok train` would refuse, as one line; None if every run's parses. Checked
    before anything starts, so a bad value in the last combination does not surface hours into the sweep."""
    from moegrok.errors import MoegrokError
    from moegrok.training.config import load_config_file
    from moegrok.training.train import RunConfig

    for name, args in runs:
        overrides = args[:args.index("--fork")] if "--fork" in args else args
        try:
            RunConfig.from_dict(load_config_file(config, overrides))
        except MoegrokError as e:
            return f"run {name!r}: {e}"
    return None


def finished(run_dir: Path) -> bool:
    meta = run_dir / "meta.json"
    return meta.exists() and bool(json.loads(meta.read_text()).get("finished"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value[,key=value] a named configuration (repeatable; 'NAME:' = the config as is)")
    p.add_argument("--knob", action="append", default=[],
                   help="KEY=V1,V2,... one run per value (repeatable: every combination)")
    p.add_argument("--fork", action="append", default=[], help="PARENT@STEP:key=value[,key=value] (repeatable)")
    p.add_argument("--analyze", action="store_true", help="run `moegrok analyze` on each finished run")
    p.add_argument("--mesh-data", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args, extra = p.parse_known_args(argv)
    if any("=" not in e or e.startswith("-") for e in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra  # key=value overrides may also come after the options
    out = Path(args.out)
    runs = [(name, [f"train.mesh_data={args.mesh_data}", *args.overrides, *ov]) for name, ov in plan(args)]
    error = check_configs(args.config, runs)
    if error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 1
    for name, ov in runs:
        run_dir = out / name
        if finished(run_dir):
            print(f"[skip] {name}: finished", flush=True)
        else:
            cmd = [sys.executable, "-m", "moegrok.cli", "train", args.config, "--run-dir", str(run_dir),
                   "--no-progress", *ov]
            print(f"[run] {name}: {' '.join(cmd)}", flush=True)
            if not args.dry_run and subprocess.call(cmd) != 0:
                print(f"[fail] {name}: moegrok train exited non-zero; re-run this command to resume", flush=True)
                return 1
        if args.analyze and not (run_dir / "analysis" / "summary.json").exists():
            cmd = [sys.executable, "-m", "moegrok.cli", "analyze", str(run_dir), "--no-progress"]
            print(f"[analyze] {name}: {' '.join(cmd)}", flush=True)
            if not args.dry_run and subprocess.call(cmd) != 0:
                print(f"[fail] {name}: moegrok analyze exited non-zero", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
