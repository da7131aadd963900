"""The metrics study's tables from analysed runs, grouped by configuration.

    python analysis/metrics_study.py --group default=runs/default_s0,runs/default_s1 \
        --group e16=runs/e16_s0,runs/e16_s1 --domains math knowledge math_twin --control math_twin --out study.md
    python analysis/metrics_study.py --sweep runs/study --domains math knowledge math_twin --control math_twin
        (a `train/sweep.py --analyze` directory: runs NAME_s<seed> grouped by NAME)
"""
import argparse
import re
import sys
from pathlib import Path

from moegrok.analysis.multirun import load_analysis, markdown
from moegrok.errors import MoegrokError
from moegrok.rundir import write_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", action="append", default=[], metavar="LABEL=DIR[,DIR...]")
    p.add_argument("--sweep", metavar="DIR", help="group the analysed runs of a train/sweep.py directory by name")
    p.add_argument("--domains", nargs="+", required=True)
    p.add_argument("--control", nargs="*", default=[], help="control domains (shown in the lag table only)")
    p.add_argument("--out", default="-")
    a = p.parse_args(argv)
    try:
        runs = {}
        if a.sweep:
            found = sorted(d for d in Path(a.sweep).iterdir() if (d / "analysis" / "summary.json").exists())
            if not found:
                raise MoegrokError(f"{a.sweep}: no analysed runs (run train/sweep.py with --analyze)")
            for d in found:
                runs.setdefault(re.sub(r"_s\d+$", "", d.name) or "default", []).append(load_analysis(d))
        if not runs and not a.group:
            raise MoegrokError("give --group LABEL=DIR[,DIR...] or --sweep DIR")
        for g in a.group:
            label, _, dirs = g.partition("=")
            if not label or not dirs:
                raise MoegrokError(f"--group expects LABEL=DIR[,DIR...], got {g!r}")
            runs[label] = [load_analysis(d) for d in dirs.split(",")]
        text = markdown(runs, a.domains, a.control)
    except MoegrokError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.out == "-":
        print(text)
    else:
        write_text(Path(a.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
