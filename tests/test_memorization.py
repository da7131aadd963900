"""Memorization t* and the per-domain epsilon search (METHOD §2) against brute force and hand-worked cases."""
import numpy as np
import pytest

from moegrok.analysis.memorization import (MemorizationConfig, groups_by_index, memorized_since,
                                           select_epsilon)
from moegrok.errors import MoegrokError


def brute_t_star(loss_TxN, eps, delta):
    T, N = loss_TxN.shape
    out = []
    for i in range(N):
        l = loss_TxN[:, i]
        found = -1
        for t in range(T - 1):  # memorized *before* the last checkpoint
            if all(l[u] <= eps and abs(l[u] - l[-1]) <= delta for u in range(t, T)):
                found = t
                break
        out.append(found)
    return np.array(out)


def test_hand_worked_t_star():
    loss = np.array([
        [2.0, 1.0, 0.4, 0.3, 0.3],    # 0.4 is low but 0.1 away from the end (> delta): t* = 3
        [0.3, 0.9, 0.3, 0.3, 0.3],    # forgotten at 1, relearned: t* = 2
        [2.0, 2.0, 2.0, 2.0, 0.1],    # low only at the last checkpoint: not memorized
        [0.1, 0.1, 0.1, 0.1, 0.1],    # from the start: t* = 0
        [0.2, 0.2, 0.6, 0.2, 0.2],    # above eps at 2: t* = 3
        [0.1, 0.1, np.nan, 0.1, 0.1],  # a non-finite loss breaks the run: t* = 3
    ]).T
    assert memorized_since(loss, epsilon=0.5, delta=0.05).tolist() == [3, 2, -1, 0, 3, 3]


def test_random_losses_match_brute_force():
    rng = np.random.default_rng(1)
    loss = np.abs(np.cumsum(rng.normal(scale=0.05, size=(9, 200)), axis=0)) + rng.random(200) * 0.8
    for eps in (0.2, 0.5, 0.9):
        np.testing.assert_array_equal(memorized_since(loss, eps, 0.05), brute_t_star(loss, eps, 0.05))


def flat(values, T=4):
    return np.tile(np.asarray(values, dtype=float), (T, 1))


def test_epsilon_search_picks_first_grid_value_in_range():
    # 20 flat samples: share 2/20 at eps 0.1, 3/20 at 0.2, 5/20 = 0.25 at 0.3 -> 0.3 (first one in [0.20, 0.25]).
    loss = flat([0.05, 0.05, 0.15, 0.25, 0.25] + [5.0] * 15)
    ch = select_epsilon(loss)
    assert ch.epsilon == 0.3 and ch.share == pytest.approx(0.25) and ch.in_target
    assert [e for e, _ in ch.grid] == [0.1, 0.2, 0.3]


def test_epsilon_search_falls_back_to_closest_share():
    # shares: 0.1 -> 0.10, 0.2 -> 0.15, 0.3 -> 0.35, then 0.35 up to the grid end: nothing in range; 0.15 is
    # 0.075 from 0.225, 0.35 is 0.125 from it -> eps 0.2.
    loss = flat([0.05, 0.05, 0.15, 0.25, 0.25, 0.25, 0.25] + [0.95] * 13)
    ch = select_epsilon(loss)
    assert ch.epsilon == 0.2 and not ch.in_target
    # the grid runs up to the first value above every loss (0.95 -> 1.0), where all 20 are memorized
    assert ch.grid[-1] == (1.0, 1.0)
    # independent recomputation of the fallback from the grid
    best = min(ch.grid, key=lambda es: (abs(es[1] - 0.225), es[0]))
    assert best[0] == 0.2


def test_fixed_epsilon_and_groups():
    loss = flat([0.05, 0.4, 3.0])
    ch = select_epsilon(loss, MemorizationConfig(epsilon=0.5))
    assert ch.epsilon == 0.5 and ch.share == pytest.approx(2 / 3)
    g = groups_by_index(np.array([2, -1, 0, 2, 0, 1]))
    assert {k: v.tolist() for k, v in g.items()} == {0: [2, 4], 1: [5], 2: [0, 3]}


def test_too_few_checkpoints_raise():
    with pytest.raises(MoegrokError, match="at least 2 checkpoints"):
        memorized_since(np.ones((1, 3)), 0.5)
