"""Turn a sweep's run directories into the indicator benchmark tables and figures.

    python analysis/indicator_benchmark.py runs/grok_sweep [--out runs/grok_sweep/benchmark]

Every subdirectory of the sweep holding a meta.json is a run; the benchmark itself is `moegrok indicators`
(moegrok.analysis.benchmark), definitions in docs/METHOD.md §9-§10.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moegrok.analysis.benchmark import run_benchmark


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", help="default: SWEEP_DIR/benchmark")
    args = p.parse_args(argv)
    sweep = Path(args.sweep_dir)
    runs = sorted(d for d in sweep.iterdir() if (d / "meta.json").exists())
    if not runs:
        sys.exit(f"{sweep}: no run directories (subdirectories with meta.json)")
    out = Path(args.out) if args.out else sweep / "benchmark"
    run_benchmark(runs, out)
    print((out / "indicators.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
