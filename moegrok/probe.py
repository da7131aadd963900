"""Probe evaluation: the one function that turns (model, probe samples) into a probe record, shared by the trainer
and the OLMoE trajectory pipeline, plus validation loss and test-item scoring."""
from __future__ import annotations

import functools
import weakref
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moegrok import distributed
from moegrok.errors import MoegrokError
from moegrok.model.model import MoeLM, sample_nll, token_nll
from moegrok.model.moe import data_parallel_impl
from moegrok.writer import check_rows


@functools.cache
def _data_mesh() -> Mesh | None:
    """All local devices along a data axis when the process has several CPU devices (`moegrok train` with
    train.mesh_data > 1, `moegrok olmoe --cpu-devices`): the batch is then split across them, one program per core.
    Measured on a 2-core CPU (bench_olmoe's model, 32 x 128 tokens): forward 161 ms on one device, 91 ms on two."""
    devs = jax.local_devices()
    if len(devs) < 2 or devs[0].platform != "cpu":
        return None
    return Mesh(np.asarray(devs), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _replicated(state, mesh: Mesh):
    """The weights on every device of `mesh` without copying them: CPU devices share host memory, so each device's
    buffer aliases the one the weights already live in (a real copy per device would multiply the memory of an
    OLMoE checkpoint by the number of devices)."""
    sharding = NamedSharding(mesh, P())
    devices = list(mesh.devices.flat)

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.sharding.is_fully_replicated and set(x.devices()) == set(devices):
            by_dev = {s.device: s.data for s in x.addressable_shards}  # e.g. the trainer's replicated state
        elif len(x.devices()) == 1:
            view = np.asarray(x)  # zero-copy view of the CPU buffer
            by_dev = {d: jax.device_put(view, d, may_alias=True) for d in devices}
        else:
            return jax.device_put(x, sharding)  # sharded another way (expert axis): gather once
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [by_dev[d] for d in devices])

    return jax.tree.map(one, state)


_REPLICAS: "weakref.WeakKeyDictionary[MoeLM, tuple]" = weakref.WeakKeyDictionary()


def _replicated_cached(model: MoeLM, state, mesh: Mesh):
    """`_replicated`, remembered per model while its weights are the same arrays (a probe record calls the jitted
    function once per batch; re-aliasing every leaf each time cost ~4 ms of a 100 ms batch). Keyed weakly on the
    model, so a freed checkpoint is not kept alive."""
    key = tuple(id(x) for x in jax.tree.leaves(state))
    hit = _REPLICAS.get(model)
    if hit is not None and hit[0] == key and hit[1] is mesh:
        return hit[3]
    rep = _replicated(state, mesh)
    _REPLICAS[model] = (key, mesh, state, rep)  # `state` pins the arrays, so their ids stay theirs
    return rep


def _jit_on_state(fn):
    """`jax.jit` over the model's split state instead of `nnx.jit` over the model: measured on a 1.36 GiB OLMoE
    checkpoint, `nnx.jit` held a second copy of the weights (pipeline peak 2.8x the checkpoint, 1.8x this way).
    The graphdef is static (hashable), so one compile per model structure.

    `fn(model, moe_impl, *batch_arrays)` returns per-row arrays; callers pass NumPy batches padded to
    `_batch_rows` rows. Under `_data_mesh()` the rows are split across the devices (shard_map)."""
    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def pure(state, graphdef, mesh, impl, *args):
        if mesh is None:
            return fn(nnx.merge(graphdef, state), None, *args)

        def local(state, *args):
            return fn(nnx.merge(graphdef, state), impl, *args)

        return jax.shard_map(local, mesh=mesh, in_specs=(P(),) + (P("data"),) * len(args), out_specs=P("data"),
                             check_vma=False)(state, *args)

    def call(model: MoeLM, *args):
        graphdef, state = nnx.split(model)
        state = distributed.host_local(state)  # a multi-process trainer's global arrays: this process's replica
        mesh = _data_mesh()
        impl = None
        if mesh is not None:
            state = _replicated_cached(model, state, mesh)
            args = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args)
            impl = data_parallel_impl(model.cfg.moe_impl)
        return pure(state, graphdef, mesh, impl, *args)

    return call


def _batch_rows(batch_size: int, n: int) -> int:
    """Rows per compiled batch: at most `batch_size` (fewer if there are fewer samples), a multiple of the number
    of data-parallel devices."""
    mesh = _data_mesh()
    per = 1 if mesh is None else mesh.size
    return -(-min(batch_size, max(n, 1)) // per) * per


@_jit_on_state
def _probe_batch(model: MoeLM, moe_impl, tokens_BxT, mask_BxT, answer_BxT):
    out = model(tokens_BxT, mask_BxT, moe_impl=moe_impl)
    nll, valid = token_nll(out.logits, tokens_BxT, mask_BxT)
    ans = (valid & answer_BxT[:, 1:]).astype(jnp.float32)  # position t scores token t+1
    n_ans = ans.sum(1)
    answer_loss = jnp.where(n_ans > 0, jnp.sum(nll * ans, axis=1) / jnp.maximum(n_ans, 1.0), jnp.nan)
    # g: the routing distribution (METHOD §4); top-k: the experts the model chose, weighted by g (before any
    # renormalisation or scaling the family applies to its mixing weights).
    probs_LxBxTxE, topw, topi = model.routing(out.router_logits)
    m = mask_BxT.astype(jnp.float32)
    route_probs_BxLxE = jnp.einsum("lbte,bt->ble", probs_LxBxTxE, m) / jnp.maximum(m.sum(1), 1.0)[:, None, None]
    return {
        "sample_loss": sample_nll(out.logits, tokens_BxT, mask_BxT),
        "answer_loss": answer_loss,
        "route_probs": route_probs_BxLxE,
        "topk_ids": jnp.transpose(topi, (1, 2, 0, 3)).astype(jnp.int32),  # [B, T, L, k]
        "topk_weights": jnp.transpose(topw, (1, 2, 0, 3)),
    }


def _map_rows(batch_fn, model: MoeLM, arrays: Sequence[np.ndarray], batch_size: int, progress=None):
    """`batch_fn`'s per-row outputs (a pytree of arrays with rows first) over all rows of `arrays`.

    Rows go in batches padded to one compiled size. With several processes each computes an equal share of the
    rows on its own devices and the shares are gathered, so every process gets the whole result, in row order."""
    n = arrays[0].shape[0]
    start, stop, share = distributed.row_share(n)
    share = max(share, 1)  # no rows: one padded batch still gives the output's shape
    mine = [_pad_rows(a[start:stop], share) for a in arrays]
    bs = _batch_rows(batch_size, share)
    parts = []
    for sl in _batches(share, bs):
        out = batch_fn(model, *(_pad_rows(a[sl], bs) for a in mine))
        parts.append(jax.tree.map(lambda v, k=sl.stop - sl.start: np.asarray(v)[:k], out))
        if progress is not None:
            progress.update(max(0, min(sl.stop, stop - start) - sl.start))
    local = jax.tree.map(lambda *v: np.concatenate(v), *parts)
    return jax.tree.map(lambda a: a[:n], distributed.gather_rows(local, n))


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Pad the last batch to a fixed size so one compiled program serves every batch."""
    if a.shape[0] == rows:
        return a
    pad = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
    return np.concatenate([a, pad])


class ProbeInputError(MoegrokError, ValueError):
    """Token rows a probe function cannot use; the message names the function, the argument and what it expected."""


def _rows(model: MoeLM, tokens_NxT, mask_NxT, where: str, **extra) -> tuple[np.ndarray, ...]:
    return check_rows(tokens_NxT, mask_NxT, where, model.cfg.vocab_size, ProbeInputError, **extra)


def probe_record(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, sample_ids: Sequence[int],
                 domains: Sequence[str], batch_size: int = 64, progress=None,
                 answer_mask_NxT: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sample mean NLL, token-mean full router softmax per layer, per-token top-k routing, router weights.

    With ``answer_mask_NxT`` (True on the tokens a document's rules determine, e.g. the ``c`` of ``a + b = c``)
    the record also holds ``answer_loss``: the mean NLL over those tokens only, NaN for a sample without any.
    Returns a dict with the fields of `moegrok.rundir.PROBE_FIELDS` (plus ``answer_loss`` when asked).
    """
    with_answer = answer_mask_NxT is not None
    tokens_NxT, mask_NxT, answer_NxT = _rows(
        model, tokens_NxT, mask_NxT, "probe_record",
        answer_mask=answer_mask_NxT if with_answer else np.zeros(np.shape(tokens_NxT), bool))
    n = tokens_NxT.shape[0]
    if len(sample_ids) != n or len(domains) != n:
        raise ProbeInputError(f"probe_record: {n} token rows but {len(sample_ids)} sample_ids and {len(domains)} "
                              "domains; one of each per row")
    rec = _map_rows(_probe_batch, model, (tokens_NxT, mask_NxT, answer_NxT), batch_size, progress)
    if not with_answer:
        del rec["answer_loss"]
    rec["topk_ids"] = np.where(mask_NxT[:, :, None, None], rec["topk_ids"], 0).astype(np.int32)
    rec["topk_weights"] = np.where(mask_NxT[:, :, None, None], rec["topk_weights"], 0.0).astype(np.float32)
    rec.update(
        sample_ids=np.asarray(sample_ids, np.int64),
        domains=np.asarray(list(domains), dtype=str),
        router_weights=np.asarray(distributed.host_local(model.router_weights()), np.float32),
        token_mask=mask_NxT,
        tokens=tokens_NxT,
    )
    return rec


@_jit_on_state
def _nll_batch(model: MoeLM, moe_impl, tokens_BxT, mask_BxT):
    nll, valid = token_nll(model(tokens_BxT, mask_BxT, moe_impl=moe_impl).logits, tokens_BxT, mask_BxT)
    v = valid.astype(jnp.float32)
    return jnp.sum(nll * v, axis=1), jnp.sum(v, axis=1)  # per row: summed on the host


def mean_token_nll(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, batch_size: int = 64) -> float:
    """Validation loss: mean next-token NLL over all valid positions of all samples."""
    tokens_NxT, mask_NxT = _rows(model, tokens_NxT, mask_NxT, "mean_token_nll")
    s, c = _map_rows(_nll_batch, model, (tokens_NxT, mask_NxT), batch_size)
    return float(s.sum(dtype=np.float64)) / max(float(c.sum(dtype=np.float64)), 1.0)


@_jit_on_state
def _token_logprobs(model: MoeLM, moe_impl, tokens_BxT, mask_BxT):
    return -token_nll(model(tokens_BxT, mask_BxT, moe_impl=moe_impl).logits, tokens_BxT)[0]


def token_logprobs(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """log p(token t+1 | tokens <= t) for every position, [N, T-1] (multiple-choice scoring)."""
    tokens_NxT, mask_NxT = _rows(model, tokens_NxT, mask_NxT, "token_logprobs")
    return _map_rows(_token_logprobs, model, (tokens_NxT, mask_NxT), batch_size)


@_jit_on_state
def _answer_hits(model: MoeLM, moe_impl, tokens_BxT, mask_BxT, answer_mask_BxT):
    pred = jnp.argmax(model(tokens_BxT, mask_BxT, moe_impl=moe_impl).logits[:, :-1], axis=-1)
    hit = (pred == tokens_BxT[:, 1:]) | ~answer_mask_BxT[:, 1:]
    return jnp.all(hit, axis=1)


def score_answers(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, answer_mask_NxT: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
    """Exact match of the answer tokens under argmax decoding, one bool per item (rows are `prompt answer`).

    Teacher-forced argmax over the answer positions: an answer is all-correct under teacher forcing exactly when
    greedy decoding reproduces it, so one forward pass per item replaces a decoding loop.
    """
    tokens_NxT, mask_NxT, answer_NxT = _rows(model, tokens_NxT, mask_NxT, "score_answers",
                                             answer_mask=answer_mask_NxT)
    n = tokens_NxT.shape[0]
    if n == 0:
        return np.zeros((0,), bool)
    if not answer_NxT.any(axis=1).all():
        bad = np.flatnonzero(~answer_NxT.any(axis=1))
        raise ProbeInputError(f"score_answers: every test item needs at least one answer token; rows {bad[:5].tolist()}"
                              f"{' ...' if len(bad) > 5 else ''} have none")
    return _map_rows(_answer_hits, model, (tokens_NxT, mask_NxT, answer_NxT), batch_size)
