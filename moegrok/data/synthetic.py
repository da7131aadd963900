"""Synthetic domains as finite fact tables: every statement of a document is one fact ``prompt answer ;``.

Each generator is a pure function of its :class:`DomainConfig` and a NumPy generator. It returns the facts, which of
them may appear in training documents, and the held-out facts that become test items. A held-out fact's answer
follows from trained facts by the domain's rule (the real domain) or from nothing at all (the twin, whose composite
answers are drawn at random per fact). Formats (twin markers in brackets):

- math:      ``a + b = c ;``                     c = (a + b) mod p                   [``#`` for ``+``]
             ``a - b = c ;`` (operation ``sub``)  c = (a - b) mod p                   [``#-`` for ``-``]
- knowledge: ``e r = e' ;`` and ``e r1 r2 = e'' ;``  e'' = f(f(e, r1), r2)              [``~`` for ``=``]
- code:      ``v add n mul m -> r ;``             left-to-right, modulo the modulus   [``~>`` for ``->``]
- retrieval: ``i in c ;``, ``c f : v ;`` and ``i f : v ;`` through the item's category  [``in~``, ``:~``]
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from moegrok.data.config import DomainConfig
from moegrok.errors import MoegrokError

END = ";"
MAX_FACTS = 200_000


@dataclasses.dataclass(frozen=True)
class FactTable:
    """Facts of one synthetic domain. Fact k renders as ``prompts[k] + answers[k] + (END,)``.

    Attributes:
        prompts, answers: word tuples per fact.
        train_facts: int64 [F_train] fact indices that training (and validation) documents draw from.
        test_facts: int64 [N_test] held-out fact indices used as test items (never in any training document).
        heldout_facts: int64 [N_held] all held-out facts (test_facts is a subset), never trained on.
        symbols: every word used, in a fixed order (the built-in vocabulary is made from these).
        answer_space: number of possible answers of a composite fact (chance accuracy is 1 / answer_space).
    """

    prompts: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, ...], ...]
    train_facts: np.ndarray
    test_facts: np.ndarray
    heldout_facts: np.ndarray
    symbols: tuple[str, ...]
    answer_space: int

    @property
    def num_facts(self) -> int:
        return len(self.prompts)


def _split(composite: np.ndarray, atomic: np.ndarray, frac: float, test_items: int, rng: np.random.Generator,
           where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hold out a share of the composite facts; everything atomic is trained."""
    n_held = int(round(frac * len(composite)))
    n_held = min(max(n_held, 1), len(composite) - 1)
    if n_held < 1:
        raise MoegrokError(f"{where}: too few composite facts ({len(composite)}) to hold any out; raise the size")
    perm = rng.permutation(composite)
    held = np.sort(perm[:n_held])
    train = np.sort(np.concatenate([atomic, perm[n_held:]])).astype(np.int64)
    test = np.sort(perm[:min(test_items, n_held)]).astype(np.int64)
    return train, test, held.astype(np.int64)


def _numbers(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def math_facts(cfg: DomainConfig, rng: np.random.Generator) -> FactTable:
    p = cfg.modulus
    op = {"add": "+", "sub": "-"}[cfg.operation]
    if cfg.twin:  # its own marker per operation, so two twins in one corpus never share a prompt
        op = "#" if op == "+" else "#" + op
    a, b = np.divmod(np.arange(p * p), p)
    c = rng.integers(0, p, size=p * p) if cfg.twin else ((a + b) if cfg.operation == "add" else (a - b)) % p
    prompts = tuple((str(x), op, str(y), "=") for x, y in zip(a.tolist(), b.tolist()))
    answers = tuple((str(z),) for z in c.tolist())
    where = f"domain '{cfg.name}'"
    train, test, held = _split(np.arange(p * p), np.zeros(0, np.int64), cfg.heldout_frac, cfg.test_items, rng, where)
    return FactTable(prompts, answers, train, test, held, tuple(_numbers(p) + [op, "=", END]), p)


def knowledge_facts(cfg: DomainConfig, rng: np.random.Generator) -> FactTable:
    E, R = cfg.entities, cfg.relations
    eq = "~" if cfg.twin else "="
    atom = rng.integers(0, E, size=(E, R))  # the world: entity x relation -> entity
    ent = [f"e{i}" for i in range(E)]
    rel = [f"r{i}" for i in range(R)]
    prompts, answers = [], []
    for e in range(E):
        for r in range(R):
            prompts.append((ent[e], rel[r], eq))
            answers.append((ent[atom[e, r]],))
    n_atomic = len(prompts)
    e2, r1, r2 = (x.ravel() for x in np.meshgrid(np.arange(E), np.arange(R), np.arange(R), indexing="ij"))
    two_hop = rng.integers(0, E, size=len(e2)) if cfg.twin else atom[atom[e2, r1], r2]
    for e, x, y, z in zip(e2.tolist(), r1.tolist(), r2.tolist(), two_hop.tolist()):
        prompts.append((ent[e], rel[x], rel[y], eq))
        answers.append((ent[z],))
    where = f"domain '{cfg.name}'"
    train, test, held = _split(np.arange(n_atomic, len(prompts)), np.arange(n_atomic), cfg.heldout_frac,
                               cfg.test_items, rng, where)
    return FactTable(tuple(prompts), tuple(answers), train, test, held, tuple(ent + rel + [eq, END]), E)


CODE_OPS = {"add": lambda x, n, m: (x + n) % m, "mul": lambda x, n, m: (x * n) % m}


def code_facts(cfg: DomainConfig, rng: np.random.Generator) -> FactTable:
    m, K = cfg.modulus, cfg.program_len
    arrow = "~>" if cfg.twin else "->"
    n_facts = sum(m * (len(CODE_OPS) * m) ** k for k in range(1, K + 1))
    if n_facts > MAX_FACTS:
        raise MoegrokError(f"domain '{cfg.name}': modulus {m} with program_len {K} gives {n_facts} programs; "
                           f"at most {MAX_FACTS} (lower modulus or program_len)")
    steps = [(op, n) for op in CODE_OPS for n in range(m)]
    prompts, answers, lengths = [], [], []
    for k in range(1, K + 1):
        for v in range(m):
            for prog in itertools.product(steps, repeat=k):
                x = v
                for op, n in prog:
                    x = CODE_OPS[op](x, n, m)
                prompts.append((str(v),) + tuple(w for op, n in prog for w in (op, str(n))) + (arrow,))
                answers.append(x)
                lengths.append(k)
    lengths_a = np.asarray(lengths)
    ans = rng.integers(0, m, size=len(answers)) if cfg.twin else np.asarray(answers)
    composite = np.flatnonzero(lengths_a == K)
    atomic = np.flatnonzero(lengths_a < K)
    where = f"domain '{cfg.name}'"
    if K == 1:  # no shorter programs to compose from: hold out single operations instead
        composite, atomic = np.arange(len(prompts)), np.zeros(0, np.int64)
    train, test, held = _split(composite, atomic, cfg.heldout_frac, cfg.test_items, rng, where)
    return FactTable(tuple(prompts), tuple((str(a),) for a in ans.tolist()), train, test, held,
                     tuple(_numbers(m) + list(CODE_OPS) + [arrow, END]), m)


def retrieval_facts(cfg: DomainConfig, rng: np.random.Generator) -> FactTable:
    P, C, F, V = cfg.items, cfg.categories, cfg.fields, cfg.values
    in_, col = ("in~", ":~") if cfg.twin else ("in", ":")
    cat = rng.integers(0, C, size=P)
    attr = rng.integers(0, V, size=(C, F))
    it, ca, fi, va = ([f"{p}{i}" for i in range(n)] for p, n in (("i", P), ("c", C), ("f", F), ("v", V)))
    prompts = [(it[i], in_) for i in range(P)]
    answers = [(ca[cat[i]],) for i in range(P)]
    for c in range(C):
        for f in range(F):
            prompts.append((ca[c], fi[f], col))
            answers.append((va[attr[c, f]],))
    n_atomic = len(prompts)
    query = rng.integers(0, V, size=(P, F)) if cfg.twin else attr[cat]
    for i in range(P):
        for f in range(F):
            prompts.append((it[i], fi[f], col))
            answers.append((va[query[i, f]],))
    where = f"domain '{cfg.name}'"
    train, test, held = _split(np.arange(n_atomic, len(prompts)), np.arange(n_atomic), cfg.heldout_frac,
                               cfg.test_items, rng, where)
    return FactTable(tuple(prompts), tuple(answers), train, test, held, tuple(it + ca + fi + va + [in_, col, END]), V)


GENERATORS = {"math": math_facts, "knowledge": knowledge_facts, "code": code_facts, "retrieval": retrieval_facts}


def make_facts(cfg: DomainConfig, rng: np.random.Generator) -> FactTable:
    return GENERATORS[cfg.kind](cfg, rng)
