"""`moegrok convert SRC DST --to {moegrok,hf}`: between Hugging Face directories (any JAX family), native model
directories and run directories (latest checkpoint; SRC only).

DST also gets SRC's tokenizer, so that `AutoTokenizer.from_pretrained(DST)` and `pipeline("text-generation",
model=DST)` work on it: a run directory's is rebuilt from its config (the built-in vocabulary, or the local Hugging
Face tokenizer of `data.tokenizer`), and the model config's pad/bos/eos ids are set to the tokenizer's; a model
directory's tokenizer files, if it has any, are copied. Model and tokenizer are written as one atomic directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from moegrok.errors import MoegrokError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a model between Hugging Face and moegrok formats",
        description="Convert SRC (a Hugging Face directory of a JAX family (olmoe, mixtral, qwen2_moe, qwen3_moe, "
                    "glm4_moe), a moegrok model directory or a run directory, "
                    "whose latest checkpoint is used) into DST, written atomically together with SRC's tokenizer "
                    "(a run's: the one it trained with).")
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


def run_tokenizer(run: Path):
    """The tokenizer the run in `run` trained with (built-in or HFTokenizer), None when its config.yaml has no
    section 'data' (a run directory not written by the trainer)."""
    from moegrok.data.config import DataConfig
    from moegrok.data.corpus import corpus_tokenizer
    from moegrok.data.tokenizer import BuiltinTokenizer
    from moegrok.rundir import RunDir

    rd = RunDir(run)
    data = rd.config.get("data")
    if not isinstance(data, dict):
        return None
    where = f"{run / 'config.yaml'}: section 'data'"
    try:
        tok = corpus_tokenizer(DataConfig.from_dict(data))
    except MoegrokError as e:
        raise MoegrokError(f"{where}: cannot rebuild the run's tokenizer ({e})") from None
    want = (rd.meta.get("corpus") or {}).get("vocab_size")
    if isinstance(tok, BuiltinTokenizer) and want is not None and int(want) != tok.vocab_size:
        raise MoegrokError(f"{where}: rebuilds a vocabulary of {tok.vocab_size} tokens, but the run trained with "
                           f"{want} (meta.json 'corpus'); was it written by another moegrok version?")
    return tok


def run(args: argparse.Namespace) -> int:
    import jax

    from moegrok.convert.hf import CONFIG, load_hf, parse_size, save_hf
    from moegrok.convert.native import is_model_dir, is_run_dir, load_model, save_model
    from moegrok.data.tokenizer import copy_hf_tokenizer_files, hf_tokenizer, save_hf_tokenizer
    from moegrok.model.model import get_params
    from moegrok.rundir import atomic_dir

    src, dst = Path(args.src), Path(args.dst)
    max_shard = parse_size(args.max_shard_size)  # fail on a bad size before the (slow) load
    if dst.exists() and not args.overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise MoegrokError(f"{dst}: already exists and is not empty (pass --overwrite)")
    tok = hf_tok = None
    if (src / CONFIG).is_file() and not is_model_dir(src):
        model = load_hf(src, dtype=args.dtype, progress=True)
    else:
        if is_run_dir(src):
            tok = run_tokenizer(src)
            hf_tok = None if tok is None else hf_tokenizer(tok)  # built (and checked) before anything is written
        model = load_model(src, step=args.step, dtype=args.dtype)
    if tok is not None:  # config.json / the manifest carry the ids the run's documents were made of
        model.cfg = model.cfg.replace(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    with atomic_dir(dst) as tmp:  # model and tokenizer files appear in DST together, or not at all
        staged = tmp / dst.name  # the writer's own atomic directory, under DST's name (its progress bar shows it)
        if args.to == "hf":
            save_hf(model, staged, max_shard_size=max_shard, progress=True)
        else:
            save_model(model, staged)
        for f in list(staged.iterdir()):
            f.rename(tmp / f.name)
        staged.rmdir()
        if tok is not None:
            files = save_hf_tokenizer(tok, tmp, hf=hf_tok)
        else:
            files = copy_hf_tokenizer_files(src, tmp) if src.is_dir() else []
    n = sum(int(x.size) for x in jax.tree.leaves(get_params(model)))
    note = "with its tokenizer" if files else "no tokenizer: SRC has none"
    print(f"wrote {dst} ({args.to}, {model.cfg.param_dtype}, {n:,} parameters; {note})")
    return 0
