"""Fact tables of the synthetic domains: rules hold in the real domains, and nothing holds in the twins."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from moegrok.data.config import DomainConfig
from moegrok.data.synthetic import make_facts
from moegrok.errors import MoegrokError


def facts(name, seed=0, **kw):
    return make_facts(DomainConfig(name, **kw), np.random.default_rng(seed))


def as_dict(f):
    return {" ".join(p): a[0] for p, a in zip(f.prompts, f.answers)}


def rule_agreement(f, rule) -> tuple[int, int]:
    """(facts whose answer equals rule(prompt words), composite facts checked); rule returns None to skip."""
    hits = n = 0
    for p, a in zip(f.prompts, f.answers):
        want = rule(p)
        if want is not None:
            n += 1
            hits += want == a[0]
    return hits, n


def math_rule(p):
    return str((int(p[0]) + int(p[2])) % 47)


def knowledge_rule_from(f):
    atom = {(p[0], p[1]): a[0] for p, a in zip(f.prompts, f.answers) if len(p) == 3}
    return lambda p: atom[(atom[(p[0], p[1])], p[2])] if len(p) == 4 else None


def code_rule(p):
    words = p[:-1]
    if len(words) < 5:  # single operations are the atomic facts
        return None
    x = int(words[0])
    for op, n in zip(words[1::2], words[2::2]):
        x = (x + int(n)) % 7 if op == "add" else (x * int(n)) % 7
    return str(x)


def retrieval_rule_from(f):
    d = as_dict(f)
    marker = f.prompts[-1][-1]
    member_mark = "in~" if marker == ":~" else "in"
    return lambda p: (d[f"{d[f'{p[0]} {member_mark}']} {p[1]} {marker}"]
                      if p[0].startswith("i") and len(p) == 3 else None)


@pytest.mark.parametrize("kind", ["math", "knowledge", "code", "retrieval"])
def test_real_domain_follows_its_rule_and_twin_does_not(kind):
    real, twin = facts(kind), facts(f"{kind}_twin")
    rules = {"math": lambda f: math_rule, "knowledge": knowledge_rule_from, "code": lambda f: code_rule,
             "retrieval": retrieval_rule_from}
    hits, n = rule_agreement(real, rules[kind](real))
    assert n > 100 and hits == n
    hits, n = rule_agreement(twin, rules[kind](twin))
    chance = 1.0 / twin.answer_space
    # twin answers agree with the rule no more than chance would (one-sided binomial test)
    assert binomtest(hits, n, chance, alternative="greater").pvalue > 1e-3, (hits, n, chance)
    assert hits / n < 2.5 * chance


def test_twin_math_is_not_commutative_either():
    d = as_dict(facts("math_twin"))
    same = sum(d[f"{a} # {b} ="] == d[f"{b} # {a} ="] for a in range(47) for b in range(a + 1, 47))
    n = 47 * 46 // 2
    assert binomtest(same, n, 1 / 47, alternative="greater").pvalue > 1e-3


@pytest.mark.parametrize("kind", ["math", "knowledge", "code", "retrieval"])
def test_twin_has_same_format_and_sizes(kind):
    real, twin = facts(kind), facts(f"{kind}_twin")
    assert real.num_facts == twin.num_facts
    assert [len(p) for p in real.prompts] == [len(p) for p in twin.prompts]
    assert (len(real.train_facts), len(real.test_facts)) == (len(twin.train_facts), len(twin.test_facts))
    assert not set(map(tuple, real.prompts)) & set(map(tuple, twin.prompts))


@pytest.mark.parametrize("kind,expect_held", [("math", round(0.5 * 47 * 47)), ("knowledge", 300),
                                              ("code", round(0.2 * 7 * 14 * 14)), ("retrieval", 150)])
def test_split_is_disjoint_and_atomic_facts_are_trained(kind, expect_held):
    f = facts(kind)
    train, held, test = set(f.train_facts.tolist()), set(f.heldout_facts.tolist()), set(f.test_facts.tolist())
    assert not train & held and test <= held
    assert train | held == set(range(f.num_facts))
    assert len(held) == expect_held and len(test) == min(400, expect_held)
    # held-out facts are composites only: the longest prompts of the domain (math: all prompts are alike)
    longest = max(len(p) for p in f.prompts)
    assert all(len(f.prompts[k]) == longest for k in held)
    if kind == "retrieval":
        assert all(f.prompts[k][0].startswith("i") and f.prompts[k][-1] == ":" for k in held)


def test_knobs_change_sizes():
    f = facts("knowledge", entities=5, relations=3, heldout_frac=0.5)
    assert f.num_facts == 5 * 3 + 5 * 3 * 3
    assert len(f.heldout_facts) == round(0.5 * 45)
    c = facts("code", modulus=3, program_len=3)
    assert c.num_facts == 3 * 6 + 3 * 36 + 3 * 216
    assert max(len(p) for p in c.prompts) == 1 + 2 * 3 + 1


def test_seed_changes_facts_and_split():
    a, b = facts("knowledge", seed=0), facts("knowledge", seed=1)
    assert a.answers != b.answers
    assert not np.array_equal(a.test_facts, b.test_facts)
    again = facts("knowledge", seed=0)
    assert a.answers == again.answers and np.array_equal(a.test_facts, again.test_facts)


def test_math_subtraction_follows_its_rule_and_has_its_own_markers():
    f = facts("math_sub", kind="math", operation="sub", modulus=11)
    d = as_dict(f)
    assert len(d) == 121 and all(d[f"{a} - {b} ="] == str((a - b) % 11) for a in range(11) for b in range(11))
    twin = facts("sub_twin", kind="math", operation="sub", twin=True, modulus=11)
    assert {p[1] for p in twin.prompts} == {"#-"}  # not the addition twin's '#'
    hits, n = rule_agreement(twin, lambda p: str((int(p[0]) - int(p[2])) % 11))
    assert hits / n < 0.25
    # a corpus with both rule domains and both twins builds (four distinct operators)
    from moegrok.data import DataConfig, build_corpus

    corpus = build_corpus(DataConfig.from_dict({"num_steps": 2, "val_docs": 2, "probe_docs": 2, "domains": {
        "math": {"docs_per_step": 2, "modulus": 11}, "math_sub": {"kind": "math", "operation": "sub",
                                                                  "docs_per_step": 2, "modulus": 11},
        "math_twin": {"docs_per_step": 2, "modulus": 11},
        "sub_twin": {"kind": "math", "twin": True, "operation": "sub", "docs_per_step": 2, "modulus": 11}}}))
    assert len(corpus.domains) == 4


def test_math_operation_is_validated():
    with pytest.raises(MoegrokError, match="operation"):
        DomainConfig("math", operation="mul")
    with pytest.raises(MoegrokError, match="operation"):
        DomainConfig("knowledge", operation="sub")
