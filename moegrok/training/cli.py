"""`moegrok train CONFIG --run-dir DIR [key=value ...]`."""
from __future__ import annotations

import argparse

from moegrok import distributed


def register(sub) -> None:
    p = sub.add_parser("train", help="train one epoch, writing checkpoints with probe records (resumes)",
                       description="Train a MoE LM for one epoch on the config's corpus. Re-running on a run "
                                   "directory that holds checkpoints of the same config resumes it.")
    p.add_argument("config", help="YAML config with sections model / data / train, or the name of a packaged "
                                   "config (default, tiny, ...)")
    p.add_argument("--run-dir", required=True, help="output run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.learning_rate=3e-4 data.seed=1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-sample-ids", action="store_true",
                   help="append each step's training-sample ids to RUN_DIR/sample_ids.jsonl (audits one epoch)")
    p.add_argument("--fork", metavar="RUN_DIR@STEP",
                   help="start from another run's checkpoint at STEP with this config's optimizer settings (same "
                        "data order, continuing the epoch); only train.{learning_rate, weight_decay, schedule, ...} "
                        "may differ from the parent's config")
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moegrok.writer import check_unlocked

    check_unlocked(args.run_dir)  # a second trainer on this run directory stops here, before JAX starts
    from moegrok.training.config import load_config_file, request_host_devices
    from moegrok.training.train import RunConfig, parse_fork, train

    cfg = RunConfig.from_dict(load_config_file(args.config, args.overrides))
    fork = parse_fork(args.fork) if args.fork else None
    if distributed.requested(args):
        # A CPU process exposes its part of the mesh as XLA devices; an even split when the count is known.
        n = distributed.resolve(args)["num_processes"]
        if n:
            request_host_devices(-(-cfg.train.mesh_devices // n))
        distributed.initialize(args)
    else:  # one host: a CPU is split into as many XLA devices as the mesh asks for
        request_host_devices(cfg.train.mesh_devices)
    try:
        train(cfg, args.run_dir, progress=not args.no_progress, log_sample_ids=args.log_sample_ids, fork=fork)
    except distributed.ProcessLost as e:
        distributed.exit_after_loss(e, "train")
    print(f"run directory: {args.run_dir}")
    return 0
