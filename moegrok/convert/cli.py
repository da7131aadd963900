"""`moegrok convert SRC DST --to {moegrok,hf}`: between Hugging Face directories (any JAX family), native model
directories and run directories (latest checkpoint; SRC only)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a model between Hugging Face and moegrok formats",
        description="Convert SRC (a Hugging Face directory of a JAX family (olmoe, mixtral, qwen2_moe, qwen3_moe, "
                    "glm4_moe), a moegrok model directory or a run directory, "
                    "whose latest checkpoint is used) into DST, written atomically.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", required=True, choices=("moegrok", "hf"),
                   help="moegrok: native model directory (orbax); hf: Hugging Face safetensors directory of the "
                        "model's family")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter dtype of the output (default: keep the source's)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step when SRC is a run directory")
    p.add_argument("--max-shard-size", default="5GB", help="--to hf: shard above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from moegrok.convert.hf import CONFIG, load_hf, parse_size, save_hf
    from moegrok.convert.native import is_model_dir, load_model, save_model
    from moegrok.model.model import get_params

    src = Path(args.src)
    max_shard = parse_size(args.max_shard_size)  # fail on a bad size before the (slow) load
    if (src / CONFIG).is_file() and not is_model_dir(src):
        model = load_hf(src, dtype=args.dtype, progress=True)
    else:
        model = load_model(src, step=args.step, dtype=args.dtype)
    if args.to == "hf":
        out = save_hf(model, args.dst, max_shard_size=max_shard, overwrite=args.overwrite, progress=True)
    else:
        out = save_model(model, args.dst, overwrite=args.overwrite)
    n = sum(int(x.size) for x in jax.tree.leaves(get_params(model)))
    print(f"wrote {out} ({args.to}, {model.cfg.param_dtype}, {n:,} parameters)")
    return 0
