"""`moegrok trajectory` (alias `moegrok olmoe`): probe records for a trajectory of Hugging Face MoE checkpoints, in
the run-directory format, so `moegrok analyze` runs unchanged. One checkpoint is resident at a time; a checkpoint
already recorded is skipped.

Two capture backends write the same record through the same writer (`moegrok.writer.RunWriter`): `jax` loads the
checkpoint into moegrok's decoder (the families of `moegrok.families`), `torch` runs transformers' own model with
hooks on its routers (`moegrok.torch_capture`, any MoE family transformers has). `auto` takes JAX where the family is
implemented, else torch.

Per checkpoint: load (streamed), tokenize the probe texts with the checkpoint's tokenizer (or a given one), batch by
length, run the forward with routing capture, write the probe record, and optionally score multiple-choice test
items by log-likelihood (or take per-item correctness computed elsewhere).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from moegrok import distributed, rundir
from moegrok.data.user import iter_lines, json_object
from moegrok.errors import MoegrokError
from moegrok.training.config import request_host_devices
from moegrok.writer import RunWriter, check_probes

# Hub revisions (`step1000-tokens4B`, `stage1-step1000-...`) and transformers' Trainer (`checkpoint-1000`).
STEP_RES = (re.compile(r"step(\d+)"), re.compile(r"^checkpoint-(\d+)$"))
BACKENDS = ("auto", "jax", "torch")
BUCKET = 32  # pad lengths to a multiple of this: few distinct shapes, few compilations


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def _step_of(name: str) -> int | None:
    for r in STEP_RES:
        m = r.search(name)
        if m:
            return int(m.group(1))
    return None


def order_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """Steps from `stepN...` or `checkpoint-N` names when every checkpoint has one, else 1, 2, ... in the order
    given."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise MoegrokError("trajectory: no checkpoints given")
    for p in paths:
        if not p.is_dir():
            raise MoegrokError(f"{p}: not a directory (expected a Hugging Face checkpoint directory)")
    steps = [_step_of(p.name) for p in paths]
    if all(s is not None for s in steps):
        cks = sorted((Checkpoint(p, s) for p, s in zip(paths, steps)), key=lambda c: c.step)
        dup = sorted({c.step for c in cks if sum(d.step == c.step for d in cks) > 1})
        if dup:
            raise MoegrokError(f"trajectory: several checkpoints claim step(s) {dup}")
        return cks
    return [Checkpoint(p, i + 1) for i, p in enumerate(paths)]


def _read_jsonl(path: Path, required: dict[str, type], what: str) -> list[dict]:
    rows = []
    for i, line in iter_lines(path):
        if not line.strip():
            continue
        row = json_object(str(path), i, line)
        for key, typ in required.items():
            if key not in row:
                raise MoegrokError(f"{path}:{i}: missing field '{key}'")
            if not isinstance(row[key], typ):
                want = typ.__name__ if isinstance(typ, type) else typ
                raise MoegrokError(f"{path}:{i}: field '{key}' must be {want}")
        rows.append(row)
    if not rows:
        raise MoegrokError(f"{path}: no {what} (the file is empty)")
    ids = [r["id"] for r in rows]
    if len(set(map(str, ids))) != len(ids):
        raise MoegrokError(f"{path}: ids must be unique")
    return rows


def read_texts(path: str | Path) -> list[dict]:
    rows = _read_jsonl(Path(path), {"id": (int, str), "domain": str, "text": str}, "probe texts")
    for i, r in enumerate(rows, 1):
        if not r["text"]:
            raise MoegrokError(f"{path}: text of id {r['id']!r} is empty")
    return rows


def test_records(tests: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Multiple-choice items as tests.jsonl holds them: {"id", "domain", "prompt", "answer"} (the right choice)."""
    return [{"id": t["id"], "domain": t["domain"], "prompt": t["question"], "answer": t["choices"][t["answer"]]}
            for t in tests]


def read_tests(path: str | Path) -> list[dict]:
    rows = _read_jsonl(Path(path), {"id": (int, str), "domain": str, "question": str, "choices": list,
                                    "answer": int}, "test items")
    for r in rows:
        if len(r["choices"]) < 2 or not all(isinstance(c, str) and c for c in r["choices"]):
            raise MoegrokError(f"{path}: item {r['id']!r}: 'choices' must list at least 2 non-empty strings")
        if not 0 <= r["answer"] < len(r["choices"]):
            raise MoegrokError(f"{path}: item {r['id']!r}: 'answer' {r['answer']} is not an index into choices")
    return rows


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    # transformers 5 builds an empty tokenizer of the model's class from a directory without tokenizer files
    # (every text then has 0 tokens): require the files.
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise MoegrokError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                           "pass --tokenizer DIR")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; name the directory
        raise MoegrokError(f"{path}: no usable tokenizer ({type(e).__name__}: {str(e)[:200]}); pass --tokenizer DIR") \
            from None
    if len(tok) == 0:
        raise MoegrokError(f"{path}: the tokenizer has an empty vocabulary; pass --tokenizer DIR")
    return tok


def tokenize(tok, texts: Sequence[str], max_len: int, truncate: bool, what: str) -> list[list[int]]:
    out = []
    for i, t in enumerate(texts):
        ids = tok(t)["input_ids"]
        if len(ids) > max_len:
            if not truncate:
                raise MoegrokError(f"{what} #{i}: {len(ids)} tokens, longer than max length {max_len}; "
                                   f"pass --truncate to cut it or raise --max-len")
            ids = ids[:max_len]
        if len(ids) < 2:
            raise MoegrokError(f"{what} #{i}: fewer than 2 tokens, no next-token loss to measure")
        out.append(list(ids))
    return out


def _bucketed(seqs: list[list[int]], batch_size: int):
    """Index batches of similar length, each padded to a multiple of BUCKET."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        T = -(-max(len(seqs[i]) for i in idx) // BUCKET) * BUCKET
        yield idx, T


def _pad(seqs: list[list[int]], idx: list[int], T: int, pad_id: int):
    tokens = np.full((len(idx), T), pad_id, np.int32)
    mask = np.zeros((len(idx), T), bool)
    for r, i in enumerate(idx):
        tokens[r, : len(seqs[i])] = seqs[i]
        mask[r, : len(seqs[i])] = True
    return tokens, mask


# --------------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """What the trajectory loop needs of a capture backend; both produce the same probe record."""
    name: str
    load: Callable[[Path, str | None, bool], Any]  # (checkpoint, dtype, progress) -> model
    probe_record: Callable[..., dict]  # moegrok.probe.probe_record's signature
    token_logprobs: Callable[..., np.ndarray]
    context: Callable[[Any], int]  # the model's maximum sequence length


def jax_backend() -> Backend:
    from moegrok.convert.hf import load_hf
    from moegrok.probe import probe_record, token_logprobs

    return Backend("jax", lambda path, dtype, progress: load_hf(path, dtype=dtype, progress=progress), probe_record,
                   token_logprobs, lambda model: model.cfg.max_position_embeddings)


def torch_backend() -> Backend:
    from moegrok import torch_capture as tc

    def context(model) -> int:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return int(getattr(cfg, "max_position_embeddings", None) or 2048)

    def load(path, dtype, progress):
        from transformers.utils import logging as hf_logging

        if progress:
            return tc.load_model(path, dtype)
        hf_logging.disable_progress_bar()  # --no-progress: transformers' "Loading weights" bar too
        try:
            return tc.load_model(path, dtype)
        finally:
            hf_logging.enable_progress_bar()

    return Backend("torch", load, tc.probe_record, tc.token_logprobs, context)


def choose_backend(requested: str, model_type: Any) -> Backend:
    """`auto`: JAX for the families moegrok implements, torch for every other one."""
    from moegrok.families import FAMILIES

    if requested not in BACKENDS:
        raise MoegrokError(f"trajectory: --backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "jax" or (requested == "auto" and model_type in FAMILIES):
        return jax_backend()
    return torch_backend()


def record_for(model, seqs: list[list[int]], ids, domains, batch_size: int, pad_id: int, progress=None,
               backend: "Backend | None" = None) -> dict:
    """The probe record over variable-length texts: batched by length, reassembled in input order."""
    probe_record = (backend or jax_backend()).probe_record

    # The record's schema says which fields are per sample ([N, ...]) and which per token ([N, T, ...]).
    dims = {**rundir.PROBE_FIELDS, **rundir.OPTIONAL_PROBE_FIELDS}
    n, T_all = len(seqs), -(-max(map(len, seqs)) // BUCKET) * BUCKET
    parts: dict[str, Any] = {}
    for idx, T in _bucketed(seqs, batch_size):
        tokens, mask = _pad(seqs, idx, T, pad_id)
        rec = probe_record(model, tokens, mask, [ids[i] for i in idx], [domains[i] for i in idx],
                           batch_size=batch_size)
        for key, v in rec.items():
            shape = dims[key][1]
            if shape[0] != "N":  # per model (router weights)
                parts[key] = v
                continue
            per_token = shape[:2] == ("N", "T")
            if key not in parts:
                parts[key] = np.zeros((n, T_all) + v.shape[2:] if per_token else (n,) + v.shape[1:], v.dtype)
            if per_token:
                parts[key][idx, :T] = v
            else:
                parts[key][idx] = v
        if progress is not None:
            progress.update(len(idx))
    parts["sample_ids"] = np.asarray(ids, np.int64)  # whole-list arrays: a batch's string width may be too narrow
    parts["domains"] = np.asarray(list(domains), dtype=str)
    return parts


def score_multiple_choice(model, tok, tests: list[dict], max_len: int, batch_size: int, pad_id: int,
                          norm: str = "sum", backend: "Backend | None" = None) -> dict[str, dict]:
    """Zero-shot multiple choice: the choice with the highest log-likelihood given the question wins
    (`sum` of its tokens' log-probabilities, or their `mean`)."""
    token_logprobs = (backend or jax_backend()).token_logprobs

    seqs, owners, cont_start = [], [], []
    for j, t in enumerate(tests):
        q = tok(t["question"])["input_ids"]
        for c in t["choices"]:
            full = tok(t["question"] + c)["input_ids"]
            # The continuation is what follows the question's tokens (tokenizers may merge across the boundary,
            # so score from the first position where the joint tokenization departs from the question's).
            k = 0
            while k < min(len(q), len(full)) and q[k] == full[k]:
                k += 1
            if len(full) > max_len:
                raise MoegrokError(f"test item {t['id']!r}: question + choice is {len(full)} tokens, longer than "
                                   f"max length {max_len}")
            if k >= len(full) or k == 0:
                raise MoegrokError(f"test item {t['id']!r}: choice {c!r} adds no scorable tokens")
            seqs.append(full)
            owners.append(j)
            cont_start.append(k)
    scores = np.zeros(len(seqs))
    for idx, T in _bucketed(seqs, batch_size):
        tokens, mask = _pad(seqs, idx, T, pad_id)
        lp = token_logprobs(model, tokens, mask, batch_size)
        for r, i in enumerate(idx):
            s = lp[r, cont_start[i] - 1: len(seqs[i]) - 1]
            scores[i] = s.sum() if norm == "sum" else s.mean()
    out: dict[str, dict] = {}
    pos = 0
    for t in tests:
        nc = len(t["choices"])
        pred = int(np.argmax(scores[pos: pos + nc]))
        pos += nc
        d = out.setdefault(t["domain"], {"ids": [], "correct": []})
        d["ids"].append(t["id"])
        d["correct"].append(int(pred == t["answer"]))
    for d in out.values():
        d["accuracy"] = float(np.mean(d["correct"]))
    return out


def read_correctness(path: Path) -> dict[str, dict]:
    """Per-item correctness computed elsewhere (e.g. after LoRA tuning): {domain: {"ids": [...], "correct": [...]}}."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoegrokError(f"{path}: correctness file not found") from None
    except json.JSONDecodeError as e:
        raise MoegrokError(f"{path}: not valid JSON ({e.msg})") from None
    out = {}
    for d, v in raw.items():
        if not isinstance(v, dict) or "ids" not in v or "correct" not in v or len(v["ids"]) != len(v["correct"]):
            raise MoegrokError(f"{path}: domain {d!r} needs 'ids' and 'correct' lists of equal length")
        c = [int(bool(x)) for x in v["correct"]]
        out[d] = {"ids": list(v["ids"]), "correct": c, "accuracy": float(np.mean(c)) if c else float("nan")}
    return out


def run(checkpoints: Sequence[str | Path], texts: str | Path, run_dir: str | Path, *, tests: str | Path | None = None,
        correctness_dir: str | Path | None = None, tokenizer: str | Path | None = None, max_len: int | None = None,
        batch_size: int = 16, truncate: bool = False, dtype: str | None = None, mc_norm: str = "sum",
        backend: str = "auto", progress: bool = True) -> Path:
    run_dir = Path(run_dir)
    cks = order_checkpoints(checkpoints)
    model_type = trajectory_model_type(cks)
    chosen = choose_backend(backend, model_type)
    shapes = trajectory_shapes(cks, chosen.name)
    probes = read_texts(texts)
    test_rows = read_tests(tests) if tests else []
    if mc_norm not in ("sum", "mean"):
        raise MoegrokError(f"trajectory: --mc-norm must be 'sum' or 'mean', got {mc_norm!r}")
    probe_rows = [{"id": r["id"], "domain": r["domain"], "text": r["text"]} for r in probes]
    check_probes(run_dir, probe_rows)  # on every process, before they agree (RunWriter checks on the writer)
    # Several processes: the same inputs everywhere, checkpoints split between them (each finished one is written
    # once, by the process that computed it), the run directory's other files written by process 0.
    done = set(rundir.RunDir(run_dir).steps) if (run_dir / "meta.json").exists() else set()
    distributed.agree({"checkpoints": [(c.step, c.path.name) for c in cks], "probes": probe_rows,
                       "tests": test_rows, "done": sorted(done), "dtype": dtype, "batch_size": batch_size,
                       "max_len": max_len, "mc_norm": mc_norm, "truncate": truncate,
                       "backend": chosen.name},
                      "trajectory's inputs (checkpoints, texts, tests, options or the records already in --run-dir)")
    if distributed.is_writer():
        if (run_dir / "meta.json").exists():
            _check_same_backend(run_dir, chosen.name)
        out = RunWriter(run_dir, producer="trajectory", probes=probe_rows, tests=test_records(test_rows), meta=dict(
                domains=sorted({r["domain"] for r in probes}), finished=False, total_steps=cks[-1].step,
                checkpoints=[{"path": str(c.path), "step": c.step} for c in cks], model_type=model_type,
                backend=chosen.name, **shapes))
    distributed.barrier("trajectory: run directory ready")
    if not distributed.is_writer():
        out = RunWriter.peer(run_dir)
    try:
        todo = distributed.my_share([c for c in cks if c.step not in done])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="checkpoints", unit="ckpt", dynamic_ncols=True)
        try:
            for ck in todo:
                model = chosen.load(ck.path, dtype, progress)
                tok = load_tokenizer(Path(tokenizer) if tokenizer else ck.path)
                limit = max_len or chosen.context(model)
                pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
                seqs = tokenize(tok, [r["text"] for r in probes], limit, truncate, f"{texts}: text")
                inner = None
                if progress:
                    from tqdm.auto import tqdm

                    inner = tqdm(total=len(seqs), desc=f"step {ck.step}", unit="text", leave=False)
                with distributed.alone():  # this checkpoint is this process's alone
                    record = record_for(model, seqs, [sample_id(r["id"], i) for i, r in enumerate(probes)],
                                        [r["domain"] for r in probes], batch_size, pad_id, inner, chosen)
                    if inner:
                        inner.close()
                    ev: dict[str, Any] = {"val_loss": {}, "test": {}}
                    if correctness_dir:
                        ev["test"] = read_correctness(Path(correctness_dir) / f"{ck.path.name}.json")
                    elif test_rows:
                        ev["test"] = score_multiple_choice(model, tok, test_rows, limit, batch_size, pad_id, mc_norm,
                                                           chosen)
                out.write_checkpoint(ck.step, record, ev)
                del model, record
                gc.collect()  # one checkpoint resident at a time
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()
        try:
            distributed.barrier("trajectory: every checkpoint recorded")
        except Exception as e:
            if not distributed.peer_failure(e):
                raise
            raise distributed.lost(e, "after its checkpoints", None) from None
        if distributed.is_writer():
            out.finish()
    finally:
        out.close()
    return run_dir


def _check_same_backend(run_dir: Path, name: str) -> None:
    """Records of one run directory come from one backend (their numbers agree to ~1e-5, not bitwise)."""
    before = rundir.RunDir(run_dir).run_meta.backend
    if before is not None and before != name:
        raise MoegrokError(f"{run_dir}/meta.json: its records were captured with --backend {before}; resuming with "
                           f"{name} would mix backends (use --backend {before} or a new --run-dir)")


def trajectory_model_type(cks: Sequence[Checkpoint]) -> str:
    """The model_type all checkpoints' config.json share."""
    from moegrok.convert.hf import CONFIG, read_json

    types = {}
    for ck in cks:
        d = read_json(ck.path / CONFIG, "the model config")
        if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
            raise MoegrokError(f"{ck.path / CONFIG}: field 'model_type' missing (expected a transformers config)")
        types.setdefault(d["model_type"], ck.path)
    if len(types) > 1:
        raise MoegrokError("trajectory: the checkpoints are of different families: "
                           + ", ".join(f"{p} is {t!r}" for t, p in types.items()))
    return next(iter(types))


def _shape_jax(path: Path) -> dict[str, Any]:
    from moegrok.convert.hf import CONFIG, moe_config_from_hf_json, read_json

    cfg = moe_config_from_hf_json(read_json(path / CONFIG, "the model config"), str(path / CONFIG))
    return {"num_layers": cfg.num_moe_layers, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
            "d_model": cfg.hidden_size, "router": cfg.router}


def _shape_torch(path: Path) -> dict[str, Any]:
    """From the model transformers would build, on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moegrok.torch_capture import router_spec

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise MoegrokError(f"{path / 'config.json'}: model_type {model_type!r} is not a model the installed "
                           f"transformers knows")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoegrokError(f"{path / 'config.json'}: transformers cannot build this model "
                           f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    spec = router_spec(model)
    return {"num_layers": len(spec.layers), "num_experts": spec.num_experts, "top_k": spec.top_k,
            "d_model": spec.d_model, "router": spec.kind}


def trajectory_shapes(cks: Sequence[Checkpoint], backend: str = "jax") -> dict[str, Any]:
    """The routing shape every checkpoint's config.json gives (meta.json's fields); checkpoints must agree."""
    shape_of = _shape_jax if backend == "jax" else _shape_torch
    first = None
    for ck in cks:
        shape = shape_of(ck.path)
        if first is None:
            first = (ck, shape)
        elif shape != first[1]:
            raise MoegrokError(f"trajectory: {ck.path} has shape {shape}, {first[0].path} {first[1]}; the "
                               "checkpoints of one trajectory must share the model's shape")
    return first[1]


def sample_id(x, i: int) -> int:
    """Probe records store integer sample ids; string ids map to their row number (probes.jsonl keeps them)."""
    return int(x) if isinstance(x, int) or (isinstance(x, str) and x.isdigit()) else i


# ------------------------------------------------------------------------------------------------------ CLI
def register(sub) -> None:
    p = sub.add_parser("trajectory", aliases=["olmoe"],
                       help="probe records for a trajectory of Hugging Face MoE checkpoints",
                       description="Per checkpoint (one in memory at a time): per-sample loss and routing of the "
                                   "probe texts, optional multiple-choice test scoring; writes a run directory "
                                   "that `moegrok analyze` reads. Resumable. `olmoe` is an alias.")
    p.add_argument("--checkpoints", nargs="+",
                   help="Hugging Face checkpoint directories (names stepN... or checkpoint-N give the steps)")
    p.add_argument("--texts", help="probe texts, JSONL lines {id, domain, text}")
    p.add_argument("--run-dir", help="output run directory")
    p.add_argument("--config", help="YAML with any of these options as keys (flags win)")
    p.add_argument("--tests", help="multiple-choice test items, JSONL {id, domain, question, choices, answer}")
    p.add_argument("--correctness-dir", help="per-item correctness computed elsewhere: DIR/<checkpoint name>.json")
    p.add_argument("--tokenizer", help="tokenizer directory (default: each checkpoint's own)")
    p.add_argument("--max-len", type=int, help="max tokens per text (default: the model's context)")
    p.add_argument("--batch-size", type=int, help="texts per forward batch (default 16)")
    p.add_argument("--truncate", action="store_true", help="cut texts longer than --max-len instead of failing")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="jax: moegrok's decoder (olmoe, mixtral, qwen2_moe, qwen3_moe, glm4_moe); torch: transformers "
                        "with hooks on its routers (any MoE family); auto (default): jax where implemented")
    p.add_argument("--mc-norm", choices=["sum", "mean"], help="choice score: sum or mean token log-prob")
    p.add_argument("--cpu-devices", type=int,
                   help="on CPU, split the machine into this many XLA devices and each batch across them "
                        "(default: the number of cores, at most 8; 1 = off). Weights are shared, not copied")
    p.add_argument("--no-progress", action="store_true")
    distributed.add_arguments(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {}
    if args.config:
        from moegrok.config_values import load_yaml

        path = Path(args.config)
        if not path.is_file():
            raise MoegrokError(f"{path}: config file not found")
        opts = load_yaml(path.read_text()) or {}
        allowed = {"checkpoints", "texts", "run_dir", "tests", "correctness_dir", "tokenizer", "max_len",
                   "batch_size", "truncate", "dtype", "mc_norm", "cpu_devices", "backend"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise MoegrokError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for k in ("checkpoints", "texts", "run_dir", "tests", "correctness_dir", "tokenizer", "max_len", "batch_size",
              "dtype", "mc_norm", "cpu_devices", "backend"):
        v = getattr(args, k)
        if v is not None:
            opts[k] = v
    if args.truncate:
        opts["truncate"] = True
    for k in ("checkpoints", "texts", "run_dir"):
        if not opts.get(k):
            raise MoegrokError(f"trajectory: --{k.replace('_', '-')} is required (flag or config key '{k}')")
    cpu_devices = opts.pop("cpu_devices", None)
    if cpu_devices is None:
        cpu_devices = min(os.cpu_count() or 1, 8)
    if not isinstance(cpu_devices, int) or cpu_devices < 1:
        raise MoegrokError(f"trajectory: cpu_devices must be a positive integer, got {cpu_devices!r}")
    request_host_devices(cpu_devices)  # before anything starts JAX
    if distributed.requested(args):
        distributed.initialize(args)
    try:
        out = run(opts.pop("checkpoints"), opts.pop("texts"), opts.pop("run_dir"), progress=not args.no_progress,
                  **opts)
    except distributed.ProcessLost as e:
        distributed.exit_after_loss(e, "trajectory")
    print(f"run directory: {out}")
    return 0
