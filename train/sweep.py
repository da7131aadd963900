"""Launch a sweep: seeds x knob values (+ forks), one `moegrok train` per run, resumable.

Each run is `OUT/<name>`; a finished run (meta.json `finished: true`) is skipped, an unfinished one resumes from its
last checkpoint, so re-running the same command after an interruption completes the sweep. Runs go one at a time,
each on `--mesh-data` CPU devices (on a 2-core machine 2 is fastest).

    python train/sweep.py configs/grok.yaml --out runs/grok_sweep --seeds 0 1 2 \\
        --knob train.weight_decay=2.0,3.0 --fork "weight_decay3.0_s0@1800:train.weight_decay=6.0"

Run names: `<last part of the knob key><value>_s<seed>` (e.g. `weight_decay3.0_s1`); a fork is named after its
parent, the step and its overrides (`weight_decay3.0_s0-f1800-weight_decay6.0`). Then benchmark them with
`python analysis/indicator_benchmark.py OUT`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def plan(args) -> list[tuple[str, list[str]]]:
    """(run name, `moegrok train` arguments after the config) for every run, parents before forks."""
    key, values = (args.knob.split("=", 1) + [""])[:2] if args.knob else ("", "")
    values = [v for v in values.split(",") if v] or [None]
    runs = []
    for value in values:
        for seed in args.seeds:
            name = f"{key.split('.')[-1]}{value}_s{seed}" if value is not None else f"s{seed}"
            ov = [f"data.seed={seed}", f"train.seed={seed}"] + ([f"{key}={value}"] if value is not None else [])
            runs.append((name, ov))
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


def finished(run_dir: Path) -> bool:
    meta = run_dir / "meta.json"
    return meta.exists() and bool(json.loads(meta.read_text()).get("finished"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--knob", help="KEY=V1,V2,... (one run per value and seed)")
    p.add_argument("--fork", action="append", default=[], help="PARENT@STEP:key=value[,key=value] (repeatable)")
    p.add_argument("--mesh-data", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    for name, ov in plan(args):
        run_dir = out / name
        if finished(run_dir):
            print(f"[skip] {name}: finished", flush=True)
            continue
        cmd = ["moegrok", "train", args.config, "--run-dir", str(run_dir), "--no-progress",
               f"train.mesh_data={args.mesh_data}", *args.overrides, *ov]
        print(f"[run] {name}: {' '.join(cmd)}", flush=True)
        if not args.dry_run and subprocess.call(cmd) != 0:
            print(f"[fail] {name}: moegrok train exited non-zero; re-run this command to resume", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
