"""``moegrok theory synthetic`` and ``moegrok theory run``."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("theory", help="routing kernel, effective dimension and the bound (METHOD §7)",
                              description="Routing kernel, effective dimension and the complexity-reduced bound.")
    sub = p.add_subparsers(dest="theory_command", metavar="{synthetic,run}")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    s = sub.add_parser("synthetic", help="synthetic one-layer MoE study: d_eff vs pathway distance, bound, widths")
    s.add_argument("--out", required=True, type=Path, help="output directory (created)")
    s.add_argument("--seeds", type=int, default=20, help="seeds of the routing sweep (default 20)")
    s.add_argument("--train-seeds", type=int, default=2, help="seeds that also run the training study (default 2)")
    s.add_argument("--n", type=int, default=200, help="training samples (default 200)")
    s.add_argument("--n-test", type=int, default=200, help="held-out samples (default 200)")
    s.add_argument("--width", type=int, default=256, help="expert width of the sweep (default 256)")
    s.add_argument("--train-widths", type=_ints, default=(64, 256, 1024), help="e.g. 64,256,1024")
    s.add_argument("--alphas", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0), help="router alignments")
    s.add_argument("--temperatures", type=_floats, default=(3.0, 1.0, 0.3, 0.1), help="router temperatures")
    s.add_argument("--lam", type=float, default=0.1, help="ridge λ (absolute; default 0.1)")
    s.add_argument("--lam-rel", type=float, default=0.1, help="relative λ of the second d_eff column")
    s.add_argument("--noise", type=float, default=0.3, help="label noise σ (default 0.3)")
    s.add_argument("--C1", type=float, default=1.0)
    s.add_argument("--C2", type=float, default=1.0)
    s.add_argument("--delta", type=float, default=0.05)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synthetic)

    r = sub.add_parser("run", help="routing kernel and d_eff per checkpoint of a run directory")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/theory/)")
    r.add_argument("--layer", type=int, default=-1, help="MoE layer whose routing is g (default -1, the last)")
    r.add_argument("--lam-rel", type=float, default=0.1, help="λ = LAM_REL·Tr(H)/n (default 0.1)")
    r.add_argument("--lam", type=float, default=None, help="absolute λ instead of --lam-rel")
    r.add_argument("--tau", type=float, default=0.7)
    r.add_argument("--encoding", default="text", help="pathway encoding: text or expert (METHOD §4)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_run)


def _synthetic(args) -> int:
    from moegrok.theory.synthetic import SyntheticConfig, run_synthetic
    from moegrok.theory.synthetic_report import write_synthetic
    from moegrok.theory.report import corr_text

    cfg = dataclasses.replace(
        SyntheticConfig(), seeds=args.seeds, train_seeds=min(args.train_seeds, args.seeds), n=args.n,
        n_test=args.n_test, width=args.width, train_widths=args.train_widths, alphas=args.alphas,
        temperatures=args.temperatures, lam=args.lam, lam_rel=args.lam_rel, noise_std=args.noise, C1=args.C1,
        C2=args.C2, delta=args.delta).validate()
    t0 = time.time()
    result = run_synthetic(cfg, progress=not args.quiet)
    summary = write_synthetic(result, cfg, args.out, elapsed_s=time.time() - t0)
    print(f"distance vs d_eff/n (all runs): {corr_text(summary['corr_all'])}")
    print(f"bound violations (C1 = {cfg.C1:g}, C2 = {cfg.C2:g}): {summary['violations']}")
    for w in summary["width_rows"]:
        print(f"width {w['width']}: held-out gap network vs kernel {w['gap_net_vs_krr_held_out_mean']:.4f}")
    print(f"wrote {args.out}/theory.md ({time.time() - t0:.0f} s)")
    return 0


def _run(args) -> int:
    from moegrok.theory.fromrun import RunTheoryConfig
    from moegrok.theory.run_report import run_theory

    cfg = RunTheoryConfig(layer=args.layer, lam_rel=args.lam_rel, lam=args.lam, tau=args.tau,
                          encoding=args.encoding).validate()
    out = args.out or (args.run_dir / "theory")
    result = run_theory(args.run_dir, out, cfg, progress=not args.quiet)
    print(f"wrote {out}/theory.md ({result['rows']} rows)")
    return 0
