"""The one-epoch pipeline, checked against independent brute force over the decoded training text."""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from moegrok.data import DataConfig, DomainConfig, build_corpus
from moegrok.errors import MoegrokError

ALL_KINDS = {
    "math": {"docs_per_step": 3, "modulus": 11},
    "math_twin": {"docs_per_step": 2, "modulus": 11},
    "knowledge": {"docs_per_step": 2, "entities": 8, "relations": 4, "heldout_frac": 0.2},
    "knowledge_twin": {"docs_per_step": 1, "entities": 8, "relations": 4, "heldout_frac": 0.2},
    "code": {"docs_per_step": 2, "modulus": 5},
    "code_twin": {"docs_per_step": 1, "modulus": 5},
    "retrieval": {"docs_per_step": 2, "items": 20, "categories": 4, "fields": 3, "values": 6},
    "retrieval_twin": {"docs_per_step": 1, "items": 20, "categories": 4, "fields": 3, "values": 6},
}


def small_cfg(seed=0, num_steps=60, **kw):
    return DataConfig.from_dict({"seed": seed, "num_steps": num_steps, "val_docs": 20, "probe_docs": 10,
                                 "domains": ALL_KINDS, **kw})


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(small_cfg())


@pytest.fixture(scope="module")
def epoch(corpus):
    """Every batch of the epoch, stacked: tokens [steps*B, T], mask, sample_ids, domain_ids, plus decoded texts."""
    bs = [corpus.batch(s) for s in range(corpus.num_steps)]
    out = {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
    out["texts"] = [corpus.tokenizer.decode(t[m]) for t, m in zip(out["tokens"], out["mask"])]
    return out


def statements(text: str) -> list[tuple[list[str], str]]:
    """'a + b = c ; d + e = f ;' -> [(['a', '+', 'b', '='], 'c'), ...]: prompt words and the answer word."""
    out = []
    for st in text.split(";"):
        w = st.split()
        if w:
            out.append((w[:-1], w[-1]))
    return out


def domain_texts(corpus, epoch, name):
    i = corpus.domains.index(name)
    return [t for t, d in zip(epoch["texts"], epoch["domain_ids"]) if d == i]


# ---------------------------------------------------------------- shapes, determinism, resume
def test_batch_contract(corpus):
    b = corpus.batch(0)
    B, T = corpus.batch_size, corpus.seq_len
    assert B == sum(v["docs_per_step"] for v in ALL_KINDS.values())
    assert b["tokens"].shape == (B, T) and b["tokens"].dtype == np.int32
    assert b["mask"].shape == (B, T) and b["mask"].dtype == bool
    assert b["sample_ids"].shape == (B,) and b["sample_ids"].dtype == np.int64
    assert b["domain_ids"].shape == (B,) and b["domain_ids"].dtype == np.int32
    assert (b["tokens"][:, 0] == corpus.tokenizer.bos_id).all()
    # mask is a prefix of real tokens; everything after it is padding
    assert (b["mask"][:, :-1] >= b["mask"][:, 1:]).all()
    assert (b["tokens"][~b["mask"]] == corpus.tokenizer.pad_id).all()
    assert (b["tokens"] < corpus.tokenizer.vocab_size).all() and (b["tokens"] >= 0).all()


def test_same_seed_same_batches_other_seed_different(corpus):
    again = build_corpus(small_cfg())
    other = build_corpus(small_cfg(seed=1))
    for s in (0, 17, corpus.num_steps - 1):
        a, b, c = corpus.batch(s), again.batch(s), other.batch(s)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a["tokens"], c["tokens"])
    assert corpus.fingerprint == again.fingerprint != other.fingerprint
    assert corpus.test_set("math")["prompts"] == again.test_set("math")["prompts"]
    assert corpus.test_set("math")["prompts"] != other.test_set("math")["prompts"]


def test_batch_is_pure_function_of_step(corpus):
    late_first = corpus.batch(40)["tokens"].copy()
    for s in range(5):
        corpus.batch(s)
    np.testing.assert_array_equal(corpus.batch(40)["tokens"], late_first)
    resumed = list(corpus.batches(start=30, stop=33))
    for s, b in zip(range(30, 33), resumed):
        np.testing.assert_array_equal(b["tokens"], corpus.batch(s)["tokens"])
    corpus.batch(3)["tokens"][:] = 0  # the caller owns its copy
    assert corpus.batch(3)["tokens"][0, 0] == corpus.tokenizer.bos_id


def test_step_outside_epoch_is_an_error(corpus):
    for bad in (-1, corpus.num_steps, 2.0, True):
        with pytest.raises(MoegrokError, match="outside the epoch"):
            corpus.batch(bad)


def test_adding_a_domain_leaves_other_domains_unchanged():
    base = build_corpus(small_cfg())
    fewer = build_corpus(DataConfig.from_dict({"seed": 0, "num_steps": 60, "val_docs": 20, "probe_docs": 10,
                                               "domains": {"math": ALL_KINDS["math"]}}))
    a, b = base.batch(5), fewer.batch(5)
    m = a["domain_ids"] == 0
    dec = base.tokenizer.decode
    assert [dec(t) for t in a["tokens"][m]] == [fewer.tokenizer.decode(t) for t in b["tokens"]]


# ---------------------------------------------------------------- one epoch, exactly once
def test_every_training_document_exactly_once(corpus, epoch):
    ids = epoch["sample_ids"]
    assert len(ids) == corpus.num_steps * corpus.batch_size
    assert len(np.unique(ids)) == len(ids)
    # all documents present: the ids of each domain are one contiguous block of the right size
    for i, name in enumerate(corpus.domains):
        d_ids = np.sort(ids[epoch["domain_ids"] == i])
        assert len(d_ids) == corpus.num_steps * ALL_KINDS[name]["docs_per_step"]
        np.testing.assert_array_equal(d_ids, np.arange(d_ids[0], d_ids[0] + len(d_ids)))
    # documents are unique as text too, not only as ids
    texts = epoch["texts"]
    assert len(set(texts)) == len(texts)


def test_mixture_is_exact_per_step(corpus):
    want = np.repeat(np.arange(len(ALL_KINDS)), [v["docs_per_step"] for v in ALL_KINDS.values()])
    markers = {"math": " + ", "math_twin": " # ", "knowledge": " = ", "knowledge_twin": " ~ ", "code": " -> ",
               "code_twin": " ~> ", "retrieval": " : ", "retrieval_twin": " :~ "}
    for s in (0, 33, corpus.num_steps - 1):
        b = corpus.batch(s)
        np.testing.assert_array_equal(b["domain_ids"], want)
        for t, m, d in zip(b["tokens"], b["mask"], b["domain_ids"]):
            assert markers[corpus.domains[d]] in corpus.tokenizer.decode(t[m])


def test_probe_set(corpus, epoch):
    p = corpus.probe_set()
    n = len(p["sample_ids"])
    assert n == 10 * len(ALL_KINDS) and len(p["texts"]) == n
    where = {int(i): k for k, i in enumerate(epoch["sample_ids"])}
    for k in range(n):
        row = where[int(p["sample_ids"][k])]  # every probe is a training document...
        assert row // corpus.batch_size == p["steps"][k]  # ...trained at the step the probe set says
        np.testing.assert_array_equal(p["tokens"][k], epoch["tokens"][row])
        np.testing.assert_array_equal(p["mask"][k], epoch["mask"][row])
        assert p["domain_ids"][k] == epoch["domain_ids"][row]
        assert p["domains"][k] == corpus.domains[p["domain_ids"][k]]
        assert p["texts"][k] == epoch["texts"][row]
    for i in range(len(ALL_KINDS)):  # spread over the epoch: first probe early, last one late
        st = p["steps"][p["domain_ids"] == i]
        assert st.min() < corpus.num_steps * 0.15 and st.max() > corpus.num_steps * 0.85
    # answer_mask marks exactly the token after each prompt marker
    for k in range(n):
        toks = [corpus.tokenizer.decode([t]) for t in p["tokens"][k][p["answer_mask"][k]]]
        assert toks == [a for _, a in statements(p["texts"][k])]


def test_validation_never_trained_and_same_distribution(corpus, epoch):
    train_texts = set(epoch["texts"])
    all_ids = set(epoch["sample_ids"].tolist())
    for name in corpus.domains:
        v = corpus.val_set(name)
        assert len(v["texts"]) == 20 and v["tokens"].shape == (20, corpus.seq_len)
        assert not set(v["texts"]) & train_texts
        assert not set(v["sample_ids"].tolist()) & all_ids
        assert len(set(v["texts"])) == 20
        assert v["texts"] == [corpus.tokenizer.decode(t[m]) for t, m in zip(v["tokens"], v["mask"])]
        # same facts as training: every validation statement is a training statement
        seen = {" ".join(p + [a]) for t in domain_texts(corpus, epoch, name) for p, a in statements(t)}
        assert {" ".join(p + [a]) for t in v["texts"] for p, a in statements(t)} <= seen


# ---------------------------------------------------------------- held-out property and rules
def test_no_test_prompt_appears_in_training_text(corpus, epoch):
    # scan every training document of every domain as raw text: a test prompt must not occur anywhere
    blob = " ; ".join(epoch["texts"])
    for name in corpus.domains:
        t = corpus.test_set(name)
        assert len(t["prompts"]) > 0
        leaked = [q for q in t["prompts"] if f"; {q} " in blob or blob.startswith(q + " ")]
        assert leaked == [], f"{name}: test prompts found in training text: {leaked[:5]}"


def _train_statements(corpus, epoch, name):
    return [s for t in domain_texts(corpus, epoch, name) for s in statements(t)]


def test_math_answers_follow_the_rule(corpus, epoch):
    for p, a in _train_statements(corpus, epoch, "math"):
        assert (int(p[0]) + int(p[2])) % 11 == int(a)
    t = corpus.test_set("math")
    for prompt, ans in zip(t["prompts"], t["answers"]):
        x, op, y, eq = prompt.split()
        assert (op, eq) == ("+", "=") and (int(x) + int(y)) % 11 == int(ans)


def _evaluate_program(words: list[str], m: int) -> int:
    x = int(words[0])
    for op, n in zip(words[1::2], words[2::2]):
        x = (x + int(n)) % m if op == "add" else (x * int(n)) % m
    return x


def test_code_answers_follow_the_rule_and_tests_are_unseen_programs(corpus, epoch):
    train = _train_statements(corpus, epoch, "code")
    for p, a in train:
        assert _evaluate_program(p[:-1], 5) == int(a)
    t = corpus.test_set("code")
    lengths = {len(p) for p, _ in train}
    for prompt, ans in zip(t["prompts"], t["answers"]):
        w = prompt.split()
        assert len(w) == max(lengths)  # held-out programs have the full length
        assert _evaluate_program(w[:-1], 5) == int(ans)


def test_knowledge_test_answers_compose_trained_atomic_facts(corpus, epoch):
    atom = {}
    for p, a in _train_statements(corpus, epoch, "knowledge"):
        if len(p) == 3:
            atom[(p[0], p[1])] = a
    assert len(atom) == 8 * 4  # every atomic fact is trained
    t = corpus.test_set("knowledge")
    for prompt, ans in zip(t["prompts"], t["answers"]):
        e, r1, r2, _ = prompt.split()
        assert atom[(atom[(e, r1)], r2)] == ans


def test_retrieval_test_answers_follow_the_category(corpus, epoch):
    member, attr = {}, {}
    for p, a in _train_statements(corpus, epoch, "retrieval"):
        if p[-1] == "in":
            member[p[0]] = a
        elif p[0].startswith("c"):
            attr[(p[0], p[1])] = a
    t = corpus.test_set("retrieval")
    for prompt, ans in zip(t["prompts"], t["answers"]):
        i, f, _ = prompt.split()
        assert attr[(member[i], f)] == ans


def test_twin_prompts_never_equal_real_prompts(corpus, epoch):
    for kind in ("math", "knowledge", "code", "retrieval"):
        real = {" ".join(p) for p, _ in _train_statements(corpus, epoch, kind)}
        twin = {" ".join(p) for p, _ in _train_statements(corpus, epoch, kind + "_twin")}
        assert real and twin and not real & twin


def test_exposures_balanced_over_the_epoch(corpus, epoch):
    # counted from the text: every training fact is stated equally often (+-1, plus rare duplicate redraws)
    for name in corpus.domains:
        c = collections.Counter(" ".join(p + [a]) for p, a in _train_statements(corpus, epoch, name))
        s = corpus.summary()["domains"][name]
        assert len(c) == s["train_facts"]
        assert max(c.values()) - min(c.values()) <= 3
        assert s["exposures_per_fact_min"] == min(c.values()) and s["exposures_per_fact_max"] == max(c.values())


def test_test_set_scoring_layout(corpus):
    t = corpus.test_set("knowledge")
    tok = corpus.tokenizer
    for k in range(len(t["ids"])):
        n = t["mask"][k].sum()
        assert t["tokens"][k][0] == tok.bos_id
        assert tok.decode(t["tokens"][k][1:t["prompt_len"][k]]) == t["prompts"][k]
        assert tok.decode(t["tokens"][k][t["answer_mask"][k]]) == t["answers"][k]
        assert t["answer_mask"][k].argmax() == t["prompt_len"][k]
        assert t["answer_mask"][k][:n].sum() == n - t["prompt_len"][k]
    assert len(set(t["ids"])) == len(t["ids"])
    recs = corpus.test_records()
    assert {r["domain"] for r in recs} == set(corpus.domains)
    assert len(corpus.probe_records()) == len(corpus.probe_set()["sample_ids"])


# ---------------------------------------------------------------- sizes and errors
def test_default_config_matches_the_prototype_sizes():
    c = build_corpus(DataConfig(num_steps=20, val_docs=8, probe_docs=4))
    s = c.summary()
    assert (c.seq_len, c.batch_size, s["vocab_size"]) == (49, 32, 83)
    assert s["domains"]["math"]["heldout_facts"] + s["domains"]["math"]["train_facts"] == 47 * 47
    assert s["domains"]["knowledge"]["train_facts"] == 200 + 1700
    assert len(c.test_set("math")["ids"]) == 400 and len(c.test_set("knowledge")["ids"]) == 300


def test_seq_len_too_short_names_the_domain():
    with pytest.raises(MoegrokError, match="seq_len.*'code'"):
        build_corpus(small_cfg(seq_len=49))


def test_too_few_facts_for_unique_documents():
    cfg = DataConfig(domains=(DomainConfig("math", modulus=2, docs_per_step=4),), num_steps=50,
                     statements_per_doc=2, val_docs=2, probe_docs=2)
    with pytest.raises(MoegrokError, match="distinct documents"):
        build_corpus(cfg)


def test_colliding_domains_rejected():
    cfg = DataConfig(domains=(DomainConfig("math", modulus=7), DomainConfig("math2", kind="math", modulus=5)),
                     num_steps=5, val_docs=2, probe_docs=2)
    with pytest.raises(MoegrokError, match="same prompt"):
        build_corpus(cfg)


def test_batch_generation_is_fast():
    c = build_corpus(DataConfig(num_steps=2000, val_docs=8, probe_docs=4))
    c.batch(0)
    t0 = time.perf_counter()
    for s in range(0, 2000, 2):
        c.batch(s)
    per_batch = (time.perf_counter() - t0) / 1000
    assert per_batch < 2e-3, per_batch  # measured ~15 us; the trainer step is ~80 ms
