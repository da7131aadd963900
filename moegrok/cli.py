"""`moegrok` command line. Each subcommand lives in the module that owns its logic and exposes
`register(subparsers)`, which adds a parser whose `func(args) -> int` runs it."""
from __future__ import annotations

import argparse
import importlib
import sys

from moegrok.errors import MoegrokError

# Subcommand modules, in the order they appear in --help.
COMMAND_MODULES = [
    "moegrok.convert.cli",
    "moegrok.training.cli",
    "moegrok.analysis.cli",
    "moegrok.analysis.benchmark",
    "moegrok.theory.cli",
    "moegrok.study",
    "moegrok.trajectory",
    "moegrok.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moegrok",
        description="Train small MoE LMs, log expert routing, and measure memorization -> generalization.",
    )
    from moegrok import __version__

    parser.add_argument("--version", action="version", version=f"moegrok {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (`train CFG --run-dir D lr=...`), which argparse's
        # positional matching does not allow on its own.
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                        for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MoegrokError as e:
        print(f"moegrok {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moegrok {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
