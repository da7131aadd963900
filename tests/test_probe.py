"""Probe functions against independent NumPy computations on the model's raw outputs, one unpadded sample at a
time, and against a token-by-token greedy decoding loop; bad rows get named errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moegrok.model.config import MoeConfig
from moegrok.model.model import MoeLM
from moegrok.probe import ProbeInputError, mean_token_nll, probe_record, score_answers

CFG = MoeConfig(vocab_size=24, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                num_experts=4, num_experts_per_tok=2, moe_impl="dense", pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return MoeLM(CFG, seed=3)


def rows(n=7, T=9, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, size=n)
    tokens = rng.integers(1, CFG.vocab_size, size=(n, T))
    mask = np.arange(T)[None] < lengths[:, None]
    tokens = np.where(mask, tokens, 0)
    answer = mask & (np.arange(T)[None] >= lengths[:, None] - 2)  # the last two real tokens
    return tokens, mask, answer


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def one_sample(model, toks):
    out = model(jnp.asarray(toks[None]))
    return np.asarray(out.logits[0], np.float64), np.asarray(out.router_logits[:, 0], np.float64)


def test_probe_record_matches_per_sample_numpy(model):
    tokens, mask, answer = rows()
    rec = probe_record(model, tokens, mask, range(7), ["d"] * 7, batch_size=3, answer_mask_NxT=answer)
    for i in range(7):
        n = int(mask[i].sum())
        logits, router = one_sample(model, tokens[i, :n])
        nll = -np.take_along_axis(log_softmax(logits[:-1]), tokens[i, 1:n, None], -1)[:, 0]
        assert rec["sample_loss"][i] == pytest.approx(nll.mean(), rel=1e-5)
        ans = answer[i, 1:n]  # position t predicts token t + 1
        assert rec["answer_loss"][i] == pytest.approx(nll[ans].mean(), rel=1e-5)
        p = np.exp(log_softmax(router))  # [L, n, E]
        np.testing.assert_allclose(rec["route_probs"][i], p.mean(1), atol=1e-6)
        top = np.argsort(-p, axis=-1, kind="stable")[..., :2].transpose(1, 0, 2)  # [n, L, k]
        np.testing.assert_array_equal(rec["topk_ids"][i, :n], top)
        assert (rec["topk_ids"][i, n:] == 0).all() and (rec["topk_weights"][i, n:] == 0).all()
    np.testing.assert_allclose(rec["router_weights"], np.stack([np.asarray(l.moe.router[...]).T
                                                                for l in model.layers]), atol=0)


def test_batch_size_does_not_change_the_record(model):
    tokens, mask, answer = rows(seed=1)
    a = probe_record(model, tokens, mask, range(7), ["d"] * 7, batch_size=2, answer_mask_NxT=answer)
    b = probe_record(model, tokens, mask, range(7), ["d"] * 7, batch_size=64, answer_mask_NxT=answer)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k) if a[k].dtype.kind == "f" else \
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mean_token_nll_weights_every_position_equally(model):
    tokens, mask, _ = rows(seed=2)
    tot = cnt = 0.0
    for i in range(len(tokens)):
        n = int(mask[i].sum())
        logits, _ = one_sample(model, tokens[i, :n])
        nll = -np.take_along_axis(log_softmax(logits[:-1]), tokens[i, 1:n, None], -1)[:, 0]
        tot, cnt = tot + nll.sum(), cnt + len(nll)
    assert mean_token_nll(model, tokens, mask, batch_size=4) == pytest.approx(tot / cnt, rel=1e-5)


def greedy_matches(model, prompt, answer) -> bool:
    seq = list(prompt)
    for want in answer:
        logits, _ = one_sample(model, np.array(seq))
        got = int(np.argmax(logits[-1]))
        if got != want:
            return False
        seq.append(got)
    return True


def test_score_answers_equals_greedy_decoding(model):
    rng = np.random.default_rng(4)
    items = []
    for i in range(12):
        prompt = list(rng.integers(1, CFG.vocab_size, size=rng.integers(2, 6)))
        # half the answers are what the model itself decodes (so some are right), half random
        ans = []
        seq = list(prompt)
        for _ in range(2):
            logits, _ = one_sample(model, np.array(seq))
            ans.append(int(np.argmax(logits[-1])) if i % 2 == 0 else int(rng.integers(1, CFG.vocab_size)))
            seq.append(ans[-1])
        items.append((prompt, ans))
    T = max(len(p) + len(a) for p, a in items)
    tokens = np.zeros((12, T), np.int64)
    mask = np.zeros((12, T), bool)
    answer = np.zeros((12, T), bool)
    for r, (p, a) in enumerate(items):
        tokens[r, :len(p) + len(a)] = p + a
        mask[r, :len(p) + len(a)] = True
        answer[r, len(p):len(p) + len(a)] = True
    got = score_answers(model, tokens, mask, answer, batch_size=5)
    want = np.array([greedy_matches(model, p, a) for p, a in items])
    np.testing.assert_array_equal(got, want)
    assert want[::2].all() and not want.all()


@pytest.mark.parametrize("call, needle", [
    (lambda m, t, k, a: probe_record(m, t + 100, k, range(7), ["d"] * 7), r"token ids must be in \[0, 24\)"),
    (lambda m, t, k, a: probe_record(m, t, k[:, :-1], range(7), ["d"] * 7), "mask has shape"),
    (lambda m, t, k, a: probe_record(m, t, k, range(6), ["d"] * 7), "6 sample_ids"),
    (lambda m, t, k, a: probe_record(m, t, k, range(7), ["d"] * 7, answer_mask_NxT=a[:3]), "answer_mask has shape"),
    (lambda m, t, k, a: mean_token_nll(m, t[0], k[0]), "2-D integer array"),
    (lambda m, t, k, a: score_answers(m, t, k, a & False), r"rows \[0, 1, 2, 3, 4\] ..."),
    (lambda m, t, k, a: score_answers(m, t.astype(float), k, a), "2-D integer array"),
])
def test_bad_rows_are_named(model, call, needle):
    tokens, mask, answer = rows()
    with pytest.raises(ProbeInputError, match=needle):
        call(model, tokens, mask, answer)
