"""Probe evaluation: the one function that turns (model, probe samples) into a probe record, shared by the trainer
and the OLMoE trajectory pipeline, plus validation loss and test-item scoring."""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moegrok.model.model import MoeLM, sample_nll, token_nll


def _jit_on_state(fn):
    """`jax.jit` over the model's split state instead of `nnx.jit` over the model: measured on a 1.36 GiB OLMoE
    checkpoint, `nnx.jit` held a second copy of the weights (pipeline peak 2.8x the checkpoint, 1.8x this way).
    The graphdef is static (hashable), so one compile per model structure."""
    @functools.partial(jax.jit, static_argnums=1)
    def pure(state, graphdef, *args):
        return fn(nnx.merge(graphdef, state), *args)

    def call(model: MoeLM, *args):
        graphdef, state = nnx.split(model)
        return pure(state, graphdef, *args)

    return call


@_jit_on_state
def _probe_batch(model: MoeLM, tokens_BxT, mask_BxT, answer_BxT):
    out = model(tokens_BxT, mask_BxT)
    nll, valid = token_nll(out.logits, tokens_BxT, mask_BxT)
    ans = (valid & answer_BxT[:, 1:]).astype(jnp.float32)  # position t scores token t+1
    n_ans = ans.sum(1)
    answer_loss = jnp.where(n_ans > 0, jnp.sum(nll * ans, axis=1) / jnp.maximum(n_ans, 1.0), jnp.nan)
    k = model.cfg.num_experts_per_tok
    probs_LxBxTxE = jax.nn.softmax(out.router_logits, axis=-1)
    m = mask_BxT.astype(jnp.float32)
    route_probs_BxLxE = jnp.einsum("lbte,bt->ble", probs_LxBxTxE, m) / jnp.maximum(m.sum(1), 1.0)[:, None, None]
    topw, topi = jax.lax.top_k(probs_LxBxTxE, k)  # the routing decision itself, before any renormalisation
    return {
        "sample_loss": sample_nll(out.logits, tokens_BxT, mask_BxT),
        "answer_loss": answer_loss,
        "route_probs": route_probs_BxLxE,
        "topk_ids": jnp.transpose(topi, (1, 2, 0, 3)).astype(jnp.int32),  # [B, T, L, k]
        "topk_weights": jnp.transpose(topw, (1, 2, 0, 3)),
    }


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Pad the last batch to a fixed size so one compiled program serves every batch."""
    if a.shape[0] == rows:
        return a
    pad = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
    return np.concatenate([a, pad])


def probe_record(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, sample_ids: Sequence[int],
                 domains: Sequence[str], batch_size: int = 64, progress=None,
                 answer_mask_NxT: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sample mean NLL, token-mean full router softmax per layer, per-token top-k routing, router weights.

    With ``answer_mask_NxT`` (True on the tokens a document's rules determine, e.g. the ``c`` of ``a + b = c``)
    the record also holds ``answer_loss``: the mean NLL over those tokens only, NaN for a sample without any.
    Returns a dict with the fields of `moegrok.rundir.PROBE_FIELDS` (plus ``answer_loss`` when asked).
    """
    tokens_NxT = np.asarray(tokens_NxT, np.int32)
    mask_NxT = np.asarray(mask_NxT, bool)
    with_answer = answer_mask_NxT is not None
    answer_NxT = np.asarray(answer_mask_NxT, bool) if with_answer else np.zeros(mask_NxT.shape, bool)
    if answer_NxT.shape != mask_NxT.shape:
        raise ValueError(f"probe_record: answer_mask shape {answer_NxT.shape} != mask shape {mask_NxT.shape}")
    n = tokens_NxT.shape[0]
    bs = min(batch_size, max(n, 1))
    parts: dict[str, list] = {}
    for sl in _batches(n, bs):
        rows = sl.stop - sl.start
        out = _probe_batch(model, *(jnp.asarray(_pad_rows(a[sl], bs)) for a in (tokens_NxT, mask_NxT, answer_NxT)))
        for key, v in out.items():
            parts.setdefault(key, []).append(np.asarray(v)[:rows])
        if progress is not None:
            progress.update(rows)
    rec = {k: np.concatenate(v) for k, v in parts.items()}
    if not with_answer:
        del rec["answer_loss"]
    rec["topk_ids"] = np.where(mask_NxT[:, :, None, None], rec["topk_ids"], 0).astype(np.int32)
    rec["topk_weights"] = np.where(mask_NxT[:, :, None, None], rec["topk_weights"], 0.0).astype(np.float32)
    rec.update(
        sample_ids=np.asarray(sample_ids, np.int64),
        domains=np.asarray(list(domains), dtype=str),
        router_weights=np.asarray(model.router_weights(), np.float32),
        token_mask=mask_NxT,
        tokens=tokens_NxT,
    )
    return rec


@_jit_on_state
def _nll_batch(model: MoeLM, tokens_BxT, mask_BxT):
    nll, valid = token_nll(model(tokens_BxT, mask_BxT).logits, tokens_BxT, mask_BxT)
    v = valid.astype(jnp.float32)
    return jnp.sum(nll * v), jnp.sum(v)


def mean_token_nll(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, batch_size: int = 64) -> float:
    """Validation loss: mean next-token NLL over all valid positions of all samples."""
    tokens_NxT, mask_NxT = np.asarray(tokens_NxT, np.int32), np.asarray(mask_NxT, bool)
    n = tokens_NxT.shape[0]
    bs = min(batch_size, max(n, 1))
    tot, cnt = 0.0, 0.0
    for sl in _batches(n, bs):
        s, c = _nll_batch(model, jnp.asarray(_pad_rows(tokens_NxT[sl], bs)), jnp.asarray(_pad_rows(mask_NxT[sl], bs)))
        tot, cnt = tot + float(s), cnt + float(c)
    return tot / max(cnt, 1.0)


@_jit_on_state
def _answer_hits(model: MoeLM, tokens_BxT, mask_BxT, answer_mask_BxT):
    pred = jnp.argmax(model(tokens_BxT, mask_BxT).logits[:, :-1], axis=-1)
    hit = (pred == tokens_BxT[:, 1:]) | ~answer_mask_BxT[:, 1:]
    return jnp.all(hit, axis=1)


def score_answers(model: MoeLM, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, answer_mask_NxT: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
    """Exact match of the answer tokens under argmax decoding, one bool per item (rows are `prompt answer`).

    Teacher-forced argmax over the answer positions: an answer is all-correct under teacher forcing exactly when
    greedy decoding reproduces it, so one forward pass per item replaces a decoding loop.
    """
    tokens_NxT, mask_NxT = np.asarray(tokens_NxT, np.int32), np.asarray(mask_NxT, bool)
    answer_NxT = np.asarray(answer_mask_NxT, bool)
    n = tokens_NxT.shape[0]
    if n == 0:
        return np.zeros((0,), bool)
    if not answer_NxT.any(axis=1).all():
        raise ValueError("every test item needs at least one answer token")
    bs = min(batch_size, n)
    return np.concatenate([
        np.asarray(_answer_hits(model, *(jnp.asarray(_pad_rows(a[sl], bs))
                                         for a in (tokens_NxT, mask_NxT, answer_NxT))))[: sl.stop - sl.start]
        for sl in _batches(n, bs)])
