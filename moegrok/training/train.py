"""One-epoch next-token trainer. Every checkpoint carries the model, the optimizer, the data position and (in the
run directory's `records/`) the probe record, validation losses and per-item test correctness.

Crash safety: a checkpoint step first writes its record (atomic rename), then the orbax checkpoint (orbax finalises
by renaming a temporary directory). A crash at any point leaves the previous checkpoint as the latest valid one; a
resume restores it and replays the steps after it, which are a pure function of (config, step), so the result is
bitwise the same as an uninterrupted run on the same machine and device count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moegrok import distributed, rundir
from moegrok.analysis import indicators
from moegrok.analysis.indicators import param_norms
from moegrok.config_values import dump_yaml, load_yaml
from moegrok.errors import MoegrokError
from moegrok.model.config import MoeConfig
from moegrok.model.model import MoeLM, get_params, lm_loss_stats, set_params
from moegrok.model.moe import data_parallel_impl, load_balancing_from_stats, load_balancing_stats, router_z_stats
from moegrok.probe import mean_token_nll, probe_record, score_answers
from moegrok.training.config import TrainConfig, dataclass_from_dict
from moegrok.training.optim import lr_schedule, make_optimizer
from moegrok.writer import RunWriter, acquire_lock, release_lock


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: MoeConfig
    data: Any  # moegrok.data.DataConfig
    train: TrainConfig

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        from moegrok.data import DataConfig

        data = DataConfig.from_dict(raw.get("data") or {})
        train = dataclass_from_dict(TrainConfig, raw.get("train"), "train")
        model = dataclass_from_dict(MoeConfig, raw.get("model"), "model")
        return cls(model=model, data=data, train=train)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "data": self.data.to_dict(), "train": dataclasses.asdict(self.train)}


def checkpoint_steps(num_steps: int, cfg: TrainConfig) -> list[int]:
    if cfg.checkpoint_every:
        steps = list(range(cfg.checkpoint_every, num_steps + 1, cfg.checkpoint_every))
        return sorted(set(steps + [num_steps]))
    n = min(cfg.num_checkpoints, num_steps)
    return sorted({max(1, round(num_steps * i / n)) for i in range(1, n + 1)})


# ----------------------------------------------------------------------------------------------- sharding
def make_mesh(cfg: TrainConfig):
    n = cfg.mesh_devices
    if n == 1:
        return None
    if jax.device_count() < n:
        raise MoegrokError(f"train config: mesh_data * mesh_expert = {n} devices, but only {jax.device_count()} "
                           f"are visible (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX "
                           f"starts; `moegrok train` and `moegrok run` set it)")
    # Auto axis types: the dropless routing uses gathers/sorts that Explicit sharding rejects.
    return jax.make_mesh((cfg.mesh_data, cfg.mesh_expert), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def shard_state(state, mesh):
    """Experts' weights split along the expert axis; everything else replicated."""
    if mesh is None:
        return state

    def spec(path, x):
        name = jax.tree_util.keystr(path)
        if ("gate_up" in name or "'down'" in name or ".down" in name) and x.ndim == 3:
            return NamedSharding(mesh, P("expert"))
        return NamedSharding(mesh, P())

    def put(path, x):
        if distributed.process_count() == 1 or not x.is_fully_addressable:
            return jax.device_put(x, spec(path, x))
        # Several processes: every one holds the same value (same seed, or the same checkpoint) and gives its
        # devices their part of the global array.
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, spec(path, x), lambda idx: host[idx])

    return jax.tree_util.tree_map_with_path(put, state)


def shard_batch(x: np.ndarray, mesh):
    if mesh is None:
        return jnp.asarray(x)
    # Every process builds the same global batch (a pure function of the step) and hands over its own shards,
    # which also works when the mesh spans several hosts.
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")), lambda idx: x[idx])


# ----------------------------------------------------------------------------------------------- the step
def make_train_step(graphdef, tx: optax.GradientTransformation, model_cfg: MoeConfig, mesh=None):
    """The jitted step `(state, opt_state, tokens_BxT, mask_BxT) -> (state, opt_state, metrics)`.

    With a mesh whose data axis has more than one device, each device computes the loss and gradient of its shard
    of the batch (`shard_map`, data parallel) and the gradients are summed. The losses are written as sums over
    tokens divided by whole-batch counts (counts summed across shards first), so the sharded step optimises the
    same objective as one device, load-balancing loss included. On a multi-core CPU this is also the fast path:
    XLA:CPU runs each device's program on its own thread, so the many small ops of a small model overlap.
    """
    aux_c, z_c = model_cfg.router_aux_loss_coef, model_cfg.router_z_loss_coef
    k = model_cfg.num_experts_per_tok

    def loss_fn(state, tokens_BxT, mask_BxT, across_shards, moe_impl=None):
        # across_shards sums a statistic over the data shards (identity on one device). It is only applied to
        # counts, which carry no gradient, so no collective is differentiated.
        out = nnx.merge(graphdef, state)(tokens_BxT, mask_BxT, moe_impl=moe_impl)
        nll_sum, n_tok = lm_loss_stats(out.logits, tokens_BxT, mask_BxT)
        lm = nll_sum / jnp.maximum(across_shards(n_tok), 1.0)
        assigned_E, prob_mass_E, n_route = load_balancing_stats(out.router_logits, k, mask_BxT)
        aux = load_balancing_from_stats(across_shards(assigned_E), prob_mass_E, across_shards(n_route))
        z_sum, z_n = router_z_stats(out.router_logits, mask_BxT)
        z = z_sum / jnp.maximum(across_shards(z_n), 1.0)
        total = lm + aux_c * aux + z_c * z
        return total, {"lm_loss": lm, "aux_loss": aux, "z_loss": z}

    n_data = 1 if mesh is None else mesh.shape["data"]
    if n_data == 1:
        def loss_and_grads(state, tokens_BxT, mask_BxT):
            return jax.value_and_grad(loss_fn, has_aux=True)(state, tokens_BxT, mask_BxT, lambda x: x)
    else:
        def local(state, tokens_BxT, mask_BxT):
            across = lambda x: jax.lax.psum(jax.lax.stop_gradient(x), "data")  # noqa: E731
            # Short expert-tile loops unrolled: faster with one device per CPU core (see model/grouped.py).
            impl = data_parallel_impl(model_cfg.moe_impl)
            out = jax.value_and_grad(loss_fn, has_aux=True)(state, tokens_BxT, mask_BxT, across, impl)
            return jax.lax.psum(out, "data")  # each shard's loss and gradient are its part of the whole batch's

        # Manual over "data" only: an "expert" axis of more than one device stays with the compiler (experts'
        # weights sharded); a trivial one is made manual too, which keeps the compiler out of the step entirely.
        manual = {"data"} if mesh.shape["expert"] > 1 else set(mesh.axis_names)
        loss_and_grads = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P(),
                                       axis_names=manual, check_vma=False)

    # Parameters and optimizer state are donated: the update is written in place of the old buffers instead of
    # into fresh ones (callers must use the returned state; the model the state was split from is stale until
    # `nnx.update(model, state)`, which the trainer does before every evaluation).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(state, opt_state, tokens_BxT, mask_BxT):
        (loss, parts), grads = loss_and_grads(state, tokens_BxT, mask_BxT)
        updates, opt_state = tx.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        return state, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **parts}

    return step


# ----------------------------------------------------------------------------------------------- checkpoints
def _flat(tree) -> dict[str, Any]:
    return {f"leaf_{i:06d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _unflat(template, flat: dict):
    leaves = [flat[f"leaf_{i:06d}"] for i in range(len(jax.tree.leaves(template)))]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def checkpoint_manager(run_dir: Path) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=opts)


def save_checkpoint(mngr, step: int, model: MoeLM, opt_state) -> None:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(get_params(model)),
        opt_state=ocp.args.StandardSave(_flat(opt_state)),
        data=ocp.args.JsonSave({"next_step": int(step)}),
    ))
    mngr.wait_until_finished()


def restore_checkpoint(mngr, step: int, model: MoeLM, opt_state):
    abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(get_params(model))),
        opt_state=ocp.args.StandardRestore(abstract(_flat(opt_state))),
        data=ocp.args.JsonRestore(),
    ))
    set_params(model, got["params"])
    return _unflat(opt_state, got["opt_state"]), int(got["data"]["next_step"])


# ----------------------------------------------------------------------------------------------- run directory
def prepare_run_dir(run_dir: Path, cfg: RunConfig, corpus, extra_meta: dict | None = None, *,
                    write: bool = True) -> tuple[bool, "RunWriter | None"]:
    """Create or validate the run directory. Returns (True if it already holds this run (resume), the run's writer
    — None with ``write=False``, a process other than the writer, which only validates what is there)."""
    cfg_path = run_dir / "config.yaml"
    resolved = cfg.to_dict()
    resumed = cfg_path.exists()
    if resumed:
        diffs = config_diffs(load_yaml(cfg_path.read_text()) or {}, cfg, cfg_path)
        if diffs:
            raise MoegrokError(
                f"{run_dir} holds a run with a different config ({'; '.join(diffs[:6])}); "
                f"use a new --run-dir or the same config to resume")
        meta = json.loads((run_dir / "meta.json").read_text())
        if meta.get("data_fingerprint") not in (None, corpus.fingerprint):
            raise MoegrokError(f"{run_dir}: the training data changed since this run started (corpus fingerprint "
                               f"differs; were the corpus files edited?); resuming would not be one clean epoch")
    if not write:
        return resumed, None
    meta = dict(num_layers=cfg.model.num_moe_layers, num_experts=cfg.model.num_experts,
                top_k=cfg.model.num_experts_per_tok, d_model=cfg.model.hidden_size, domains=list(corpus.domains),
                model_type=cfg.model.family, router=cfg.model.router,
                total_steps=int(corpus_steps(corpus, cfg.train)), finished=False,
                data_fingerprint=corpus.fingerprint, corpus=corpus.summary(), **(extra_meta or {}))
    out = RunWriter(run_dir, producer="train", meta=meta, probes=corpus.probe_records(),
                    tests=corpus.test_records())
    if not resumed:
        rundir.write_text(cfg_path, dump_yaml(resolved, sort_keys=True))  # last: config.yaml = a complete start
    return resumed, out


# How a run is executed, not what it computes: the expert and attention lowerings are tested equal to the plain
# model, so a resume or a fork may pick another (e.g. the fast path of the machine it continues on).
EXECUTION_FIELDS = ("model.moe_impl", "model.attention_impl", "model.remat")


def config_diffs(saved: dict, cfg: RunConfig, source: Path, allowed: Sequence[str] = ()) -> list[str]:
    """What `cfg` changes relative to a run's saved config.yaml, both with every default filled in (a run saved
    by an older moegrok lacks fields added since), leaving out `allowed` (dotted prefixes) and execution fields."""
    try:
        old = RunConfig.from_dict(saved).to_dict()
    except MoegrokError as e:
        raise MoegrokError(f"{source}: the saved config no longer parses ({e})") from None
    skip = tuple(f"{a}:" for a in (*EXECUTION_FIELDS, *allowed))
    return [d for d in _dict_diff(old, cfg.to_dict()) if not d.startswith(skip)]


def _dict_diff(a, b, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def corpus_steps(corpus, tcfg: TrainConfig) -> int:
    return min(corpus.num_steps, tcfg.max_steps) if tcfg.max_steps else corpus.num_steps


def _copy_jsonl_until(src: Path, dst: Path, max_step: int) -> None:
    """Write the lines of a step-keyed log up to `max_step` from `src` to `dst` (atomically; `src` may be `dst`)."""
    if not src.exists():
        return
    keep = [ln for ln in src.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    rundir.write_text(dst, "".join(ln + "\n" for ln in keep))


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again."""
    _copy_jsonl_until(path, path, max_step)


# ----------------------------------------------------------------------------------------------- forks
# Train-section fields a fork may change: the optimizer and how the run is executed. Everything else (model, data,
# seed, checkpoint schedule) must equal the parent's, so the fork continues the same epoch at the same step.
FORKABLE = ("learning_rate", "weight_decay", "schedule", "min_lr_ratio", "warmup_steps", "b1", "b2", "eps",
            "clip_norm", "mesh_data", "mesh_expert", "log_every", "eval_batch_size", "tensorboard")


def parse_fork(spec: str) -> tuple[Path, int]:
    """`RUN_DIR@STEP` -> (path, step)."""
    path, sep, step = str(spec).rpartition("@")
    if not sep or not path or not step.isdigit():
        raise MoegrokError(f"--fork {spec!r}: expected RUN_DIR@STEP, e.g. runs/default@2250")
    return Path(path), int(step)


def check_fork(parent: Path, step: int, cfg: RunConfig) -> None:
    """The parent holds a checkpoint at `step` and a config this fork may continue."""
    from moegrok.rundir import RunDir

    rd = RunDir(parent)
    if step not in rd.checkpoint_steps or step not in rd.steps:
        raise MoegrokError(f"--fork {parent}@{step}: no complete checkpoint at step {step} in {parent} "
                           f"(checkpoints: {rd.checkpoint_steps})")
    diffs = config_diffs(rd.config, cfg, parent / "config.yaml", [f"train.{f}" for f in FORKABLE])
    if diffs:
        raise MoegrokError(f"--fork {parent}@{step}: a fork may change only train.{{{', '.join(FORKABLE)}}} and "
                           f"{', '.join(EXECUTION_FIELDS)}; "
                           f"this config also changes {'; '.join(diffs[:6])}")


def copy_fork_history(parent: Path, step: int, run_dir: Path) -> None:
    """Put the parent's history up to `step` into a new run directory: records, logged rows, the checkpoint."""
    records = run_dir / rundir.RECORDS
    for name in ("checkpoints", rundir.RECORDS):
        shutil.rmtree(run_dir / name, ignore_errors=True)  # leftovers of a fork attempt that crashed
    records.mkdir(parents=True)
    for src in sorted((parent / rundir.RECORDS).glob("step_*")):
        if int(src.name[5:]) <= step:
            shutil.copytree(src, records / src.name)
    for name in ("metrics.jsonl", "sample_ids.jsonl"):
        _copy_jsonl_until(parent / name, run_dir / name, step)
    tmp = run_dir / f".fork-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(parent / "checkpoints" / str(step), tmp)
    (run_dir / "checkpoints").mkdir()
    os.rename(tmp, run_dir / "checkpoints" / str(step))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(model: MoeLM, corpus, batch_size: int) -> tuple[dict, dict]:
    probes = corpus.probe_set()
    answers = probes["answer_mask"] if probes["answer_mask"].any() else None  # user text marks no answers
    record = probe_record(model, probes["tokens"], probes["mask"], probes["sample_ids"], probes["domains"],
                          batch_size=batch_size, answer_mask_NxT=answers)
    ev: dict[str, Any] = {"val_loss": {}, "test": {}}
    for d in corpus.domains:
        v = corpus.val_set(d)
        ev["val_loss"][d] = mean_token_nll(model, v["tokens"], v["mask"], batch_size)
        ts = corpus.test_set(d)
        correct = score_answers(model, ts["tokens"], ts["mask"], ts["answer_mask"], batch_size)
        ev["test"][d] = {"accuracy": float(correct.mean()) if len(correct) else float("nan"),
                         "ids": list(ts["ids"]), "correct": correct.astype(int).tolist()}
    return record, ev


# ----------------------------------------------------------------------------------------------- main loop
def train(cfg: RunConfig, run_dir: str | os.PathLike, *, progress: bool = True,
          log_sample_ids: bool = False, on_step: Callable[[int], None] | None = None,
          fork: tuple[str | os.PathLike, int] | None = None) -> Path:
    """Train one epoch into `run_dir`, resuming if it holds checkpoints of the same config.

    ``fork=(parent_run_dir, step)`` starts a new run from the parent's checkpoint at ``step`` with this config's
    optimizer settings (see FORKABLE): same data order, continuing the epoch at that step; the parent's records up to
    ``step`` are copied so the fork's run directory holds its whole trajectory, and ``meta.json`` names the parent.
    """
    with contextlib.ExitStack() as held:  # the run directory's writer lock, released however training ends
        return _train(cfg, Path(run_dir), held, progress=progress, log_sample_ids=log_sample_ids, on_step=on_step,
                      fork=fork)


def _train(cfg: RunConfig, run_dir: Path, held: contextlib.ExitStack, *, progress: bool, log_sample_ids: bool,
           on_step: Callable[[int], None] | None, fork: tuple[str | os.PathLike, int] | None) -> Path:
    from moegrok.data import build_corpus

    tcfg = cfg.train
    corpus = build_corpus(cfg.data)
    if cfg.model.vocab_size < corpus.tokenizer.vocab_size:
        raise MoegrokError(f"model config: field 'vocab_size' is {cfg.model.vocab_size}, smaller than the "
                           f"tokenizer's vocabulary ({corpus.tokenizer.vocab_size})")
    batch_rows = corpus.batch(0)["tokens"].shape[0]
    if batch_rows % tcfg.mesh_data:
        raise MoegrokError(f"train config: field 'mesh_data' ({tcfg.mesh_data}) must divide the batch's "
                           f"{batch_rows} rows (documents per step, all domains)")
    mesh = make_mesh(tcfg)  # before the run directory is touched: a bad mesh leaves nothing to clean up
    writer = distributed.is_writer()  # several processes: process 0 alone writes the run directory
    distributed.agree({"config": cfg.to_dict(), "fork": None if fork is None else int(fork[1])},
                      "the run's config (or --fork step)")
    if writer:  # one writer per run directory (RunWriter), before anything in it is read or written
        held.callback(release_lock, acquire_lock(run_dir))
    extra_meta = None
    if fork is not None:
        parent, fork_step = Path(fork[0]), int(fork[1])
        extra_meta = {"parent": {"run_dir": str(parent), "step": fork_step}}
        if (run_dir / "config.yaml").exists():  # the fork started before: resume it
            had = json.loads((run_dir / "meta.json").read_text()).get("parent")
            if had != extra_meta["parent"]:
                raise MoegrokError(f"{run_dir} already holds a run forked from {had}, not {parent}@{fork_step}; "
                                   "use a new --run-dir")
        else:
            check_fork(parent, fork_step, cfg)
            distributed.barrier("fork checked")  # nobody copies while another process still reads the parent
            if writer:
                copy_fork_history(parent, fork_step, run_dir)
    _, out = prepare_run_dir(run_dir, cfg, corpus, extra_meta, write=writer)
    distributed.barrier("run directory ready")
    num_steps = corpus_steps(corpus, tcfg)
    ckpt_steps = set(checkpoint_steps(num_steps, tcfg))

    model = MoeLM(cfg.model, seed=tcfg.seed)
    tx = make_optimizer(tcfg, num_steps)
    graphdef, state = nnx.split(model)
    opt_state = tx.init(state)
    # Placed on the mesh before a restore, so orbax restores each process's part of every array in place.
    state, opt_state = shard_state(state, mesh), shard_state(opt_state, mesh)
    nnx.update(model, state)
    mngr = checkpoint_manager(run_dir)
    start = 0
    if mngr.latest_step() is not None:
        opt_state, start = restore_checkpoint(mngr, mngr.latest_step(), model, opt_state)
        graphdef, state = nnx.split(model)
    if writer:  # lines logged after the restored step (or by an attempt that died before a checkpoint) are replayed
        _truncate_jsonl(run_dir / "metrics.jsonl", start)
        _truncate_jsonl(run_dir / "sample_ids.jsonl", start)
    step_fn = make_train_step(graphdef, tx, cfg.model, mesh)
    sched = lr_schedule(tcfg, num_steps)

    tb = None
    if tcfg.tensorboard and writer:
        from tensorboardX import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if start else None)
    bar = None
    if progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    ids_f = open(run_dir / "sample_ids.jsonl" if writer else os.devnull, "a") if log_sample_ids else None
    t_last, tok_since = time.perf_counter(), 0
    step = start
    try:
        for step in range(start + 1, num_steps + 1):
            batch = corpus.batch(step - 1)
            state, opt_state, m = step_fn(state, opt_state, shard_batch(batch["tokens"], mesh),
                                          shard_batch(batch["mask"], mesh))
            m = distributed.host_local(m)
            tok_since += int(batch["mask"].sum())
            loss = float(m["loss"])  # one sync per step: a NaN is caught at the step that made it
            if not math.isfinite(loss):
                raise MoegrokError(
                    f"non-finite loss ({loss}) at step {step}; stopped without saving. The last good checkpoint "
                    f"is step {mngr.latest_step()}; lower train.learning_rate or check the data")
            if ids_f is not None:
                ids_f.write(json.dumps({"step": step, "ids": [int(i) for i in batch["sample_ids"]]}) + "\n")
            if step % tcfg.log_every == 0 or step == num_steps:
                now = time.perf_counter()
                row = {"step": step, **{k: float(v) for k, v in m.items()},
                       "lr": float(sched(step - 1)), "tokens_per_s": tok_since / (now - t_last)}
                if out is not None:
                    out.log(step, {k: v for k, v in row.items() if k != "step"})
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                t_last, tok_since = now, 0
            if bar is not None:
                bar.update(1)
            if step in ckpt_steps:
                nnx.update(model, state)
                # Evaluation reads this process's copy of the weights (the global arrays themselves when alone);
                # its rows are spread over every process and gathered (moegrok.probe).
                local = model if distributed.process_count() == 1 else nnx.merge(
                    graphdef, distributed.host_local(state))
                record, ev = evaluate(local, corpus, tcfg.eval_batch_size)
                if ids_f is not None:
                    ids_f.flush()
                    os.fsync(ids_f.fileno())
                ev["param_norms"] = param_norms(get_params(local))
                if out is not None:  # steps after the restored checkpoint are replayed: their records replaced
                    out.write_checkpoint(step, record, ev, replace=True)
                # The live monitor: the same registry `moegrok indicators` evaluates afterwards. Logged before the
                # checkpoint, so a resume from it never lacks the row (rows after a resumed step are dropped).
                t_ind = time.perf_counter()
                live = indicators.compute(
                    indicators.Checkpoint(step, types.SimpleNamespace(**{k: np.asarray(v) for k, v in record.items()}),
                                          ev["val_loss"], ev["param_norms"]), corpus.domains)
                if out is not None:
                    out.log_indicators(step, live, indicator_seconds=time.perf_counter() - t_ind)
                save_checkpoint(mngr, step, model, opt_state)
                if tb is not None:
                    for d, v in ev["val_loss"].items():
                        tb.add_scalar(f"val_loss/{d}", v, step)
                    for d, v in ev["test"].items():
                        tb.add_scalar(f"test_accuracy/{d}", v["accuracy"], step)
                    for name, vals in live.items():
                        for d, v in vals.items():
                            tb.add_scalar(f"indicators/{name}/{d}", v, step)
                if bar is not None:
                    acc = " ".join(f"{d}={v['accuracy']:.2f}" for d, v in ev["test"].items())
                    bar.write(f"step {step}: checkpoint; test accuracy {acc}")
                t_last, tok_since = time.perf_counter(), 0  # evaluation time is not training throughput
            if on_step is not None:
                on_step(step)
    except Exception as e:
        if isinstance(e, MoegrokError) or not distributed.peer_failure(e):
            raise
        raise distributed.lost(e, f"at step {step}", mngr.latest_step()) from None
    finally:
        if ids_f is not None:
            ids_f.close()
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        mngr.close()
    if out is not None:
        out.finish()
        out.close()
    distributed.barrier("finished")
    return run_dir

