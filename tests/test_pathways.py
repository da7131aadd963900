"""Pathways (METHOD §4) against hand-worked cases and independent pure-Python / rapidfuzz references."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from moegrok.analysis import pathways as pw
from moegrok.errors import MoegrokError


def ref_tau_lists(p_NxLxE, tau):
    """The τ rule written out: sort by (-weight, index), add weights until the running sum reaches τ."""
    out = []
    for sample in np.asarray(p_NxLxE, np.float64):
        layers = []
        for row in sample:
            order = sorted(range(row.size), key=lambda e: (-row[e], e))
            kept, total = [], 0.0
            for e in order:
                kept.append(e)
                total += row[e]
                if total >= tau:
                    break
            layers.append(kept)
        out.append(layers)
    return out


def ref_text(lists):
    return ["-".join(",".join(str(e) for e in layer) for layer in s) for s in lists]


def ref_expert(lists, E):
    out = []
    for s in lists:
        seq = []
        for l, layer in enumerate(s):
            seq += ([E] if l else []) + list(layer)
        out.append(seq)
    return out


def ref_mean_pairs(seqs, pairs):
    d = [Levenshtein.distance(seqs[i], seqs[j]) for i, j in pairs]
    n = [x / max(len(seqs[i]), len(seqs[j])) if max(len(seqs[i]), len(seqs[j])) else 0.0
         for x, (i, j) in zip(d, pairs)]
    return float(np.mean(d)), float(np.mean(n))


def random_probs(rng, N, L, E, sharp=2.0):
    x = rng.normal(0, sharp, (N, L, E))
    p = np.exp(x - x.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# τ rule and encodings


def test_tau_rule_keeps_the_crossing_expert():
    p = np.array([[[0.6, 0.1, 0.3], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]])
    assert pw.expert_lists(p, 0.7) == [[[0, 2], [0, 1], [0]]]
    order, n_kept = pw.tau_rule(p, 0.7)
    assert n_kept.tolist() == [[2, 2, 1]] and order[0, 0].tolist() == [0, 2, 1]


def test_tau_rule_exact_threshold_and_ties_lower_index_first():
    # Binary fractions: the sums are exact. Reaching τ exactly stops; equal weights go lower index first.
    p = np.array([[[0.125, 0.375, 0.375, 0.125]]])
    assert pw.expert_lists(p, 0.75) == [[[1, 2]]]
    assert pw.expert_lists(p, 0.74) == [[[1, 2]]]
    assert pw.expert_lists(p, 0.76) == [[[1, 2, 0]]]
    assert pw.expert_lists(np.full((1, 1, 4), 0.25), 0.5) == [[[0, 1]]]
    assert pw.expert_lists(np.full((1, 1, 4), 0.25), 1.0) == [[[0, 1, 2, 3]]]


def test_tau_rule_matches_reference_on_random_routing():
    rng = np.random.default_rng(0)
    p = random_probs(rng, 20, 4, 8, sharp=1.0)
    p[3, 1] = 1.0 / 8  # a fully tied layer
    p[5, 2, :4] = p[5, 2, 4:]  # pairwise ties
    for tau in (0.3, 0.7, 0.95):
        assert pw.expert_lists(p, tau) == ref_tau_lists(p, tau)


def test_text_and_expert_encodings_of_a_known_routing():
    E = 10
    p = np.zeros((2, 3, E))
    p[0, 0, [3, 1, 5]] = [0.5, 0.3, 0.2]  # keeps 3,1 (0.8 >= 0.7)
    p[0, 1, [9, 1]] = [0.4, 0.6]  # keeps 1,9
    p[0, 2, 0] = 1.0
    p[1] = 1.0 / E  # uniform: keeps the 7 lowest indices
    assert pw.encode_pathways(p, 0.7, "text") == ["3,1-1,9-0", "-".join(["0,1,2,3,4,5,6"] * 3)]
    exp = pw.encode_pathways(p, 0.7, "expert")
    assert exp[0].tolist() == [3, 1, E, 1, 9, E, 0]
    assert len(exp[1]) == 3 * 7 + 2
    assert pw.layer_pathways(p, 0.7, "text")[1] == ["1,9", "0,1,2,3,4,5,6"]
    assert pw.layer_pathways(p, 0.7, "expert")[0][0].tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------------------------
# Pairs and distances


def test_pair_indices_all_then_fixed_seed_sample():
    i, j, sampled = pw.pair_indices(5)
    assert not sampled and list(zip(i, j)) == list(itertools.combinations(range(5), 2))
    i, j, sampled = pw.pair_indices(40, max_all_pairs=10, num_sampled_pairs=200, seed=3)
    assert sampled and i.size == 200 and (i < j).all() and j.max() < 40
    assert len(set(zip(i.tolist(), j.tolist()))) == 200  # without replacement
    i2, j2, _ = pw.pair_indices(40, max_all_pairs=10, num_sampled_pairs=200, seed=3)
    assert (i == i2).all() and (j == j2).all()  # identical at every checkpoint
    i3, _, _ = pw.pair_indices(40, max_all_pairs=10, num_sampled_pairs=200, seed=4)
    assert not (i == i3).all()
    # Default sample size: as many pairs as all pairs at the threshold.
    assert pw.pair_indices(12, max_all_pairs=10)[0].size == 45


def test_triangular_decode_is_exact():
    for n in (2, 3, 50, 4097):
        i, j = np.triu_indices(n, k=1)
        di, dj = pw._triu_decode(np.arange(i.size), n)
        assert (di == i).all() and (dj == j).all()


def test_pathway_distance_equals_reference_mean():
    rng = np.random.default_rng(1)
    p = random_probs(rng, 9, 4, 16, sharp=1.5)
    lists = ref_tau_lists(p, 0.7)
    pairs = list(itertools.combinations(range(9), 2))
    for enc, seqs in (("text", ref_text(lists)), ("expert", ref_expert(lists, 16))):
        got = pw.pathway_distance(p, tau=0.7, encoding=enc)
        want = ref_mean_pairs(seqs, pairs)
        assert got.num_pairs == 36 and not got.sampled
        assert got.mean == pytest.approx(want[0]) and got.mean_normalised == pytest.approx(want[1])


def test_sampled_pairs_distance_matches_reference_on_those_pairs():
    rng = np.random.default_rng(2)
    p = random_probs(rng, 30, 3, 8)
    seqs = ref_text(ref_tau_lists(p, 0.7))
    i, j, d, dn, sampled = pw.pair_distances(seqs, max_all_pairs=8, num_sampled_pairs=50, seed=1)
    assert sampled and d.size == 50
    assert d.tolist() == [Levenshtein.distance(seqs[a], seqs[b]) for a, b in zip(i, j)]
    got = pw.pathway_distance(p, max_all_pairs=8, num_sampled_pairs=50, seed=1)
    assert got.sampled and got.mean == pytest.approx(ref_mean_pairs(seqs, list(zip(i, j)))[0])


def test_normalised_distance_of_empty_pathways_is_zero():
    got = pw.mean_pair_distance(["", "", "ab"])
    assert got.mean == pytest.approx((0 + 2 + 2) / 3) and got.mean_normalised == pytest.approx((0 + 1 + 1) / 3)


def test_cross_distance_and_layerwise_against_reference():
    rng = np.random.default_rng(3)
    a = ["1,2-3", "4-5,6,7", ""]
    b = ["1,2-3,4", "9"]
    got = pw.mean_cross_distance(a, b)
    want = ref_mean_pairs(a + b, [(x, 3 + y) for x in range(3) for y in range(2)])
    assert got.num_pairs == 6 and got.mean == pytest.approx(want[0]) and got.mean_normalised == pytest.approx(want[1])
    samp = pw.mean_cross_distance(a, b, max_all_pairs=2, num_sampled_pairs=3)
    assert samp.sampled and samp.num_pairs == 3

    p = random_probs(rng, 6, 3, 8)
    lists = ref_tau_lists(p, 0.7)
    lw = pw.layerwise_distance(p, tau=0.7, encoding="expert")
    pairs = list(itertools.combinations(range(6), 2))
    for l in range(3):
        want = ref_mean_pairs([s[l] for s in lists], pairs)
        assert lw.mean_L[l] == pytest.approx(want[0]) and lw.mean_normalised_L[l] == pytest.approx(want[1])


# ---------------------------------------------------------------------------------------------------------------
# Token level


def ref_token_seq(ids_Lxk, E):
    seq = []
    for l, layer in enumerate(ids_Lxk):
        seq += ([E] if l else []) + list(layer)
    return seq


def test_token_pathway_distance_position_and_prefix_alignment():
    rng = np.random.default_rng(4)
    N, T, L, k, E = 5, 6, 3, 2, 8
    ids = np.stack([rng.permutation(E)[:k] for _ in range(N * T * L)]).reshape(N, T, L, k)
    ids[1] = ids[0]  # a duplicate sample: identical token pathways are shared
    mask = np.ones((N, T), bool)
    mask[2, 4:] = False  # right padding
    mask[3, :2] = False  # left padding: position vs prefix alignment differ
    mask[4, 3] = False

    def ref(align):
        per_pair = []
        for a, b in itertools.combinations(range(N), 2):
            if align == "position":
                ta = tb = [t for t in range(T) if mask[a, t] and mask[b, t]]
            else:
                ra, rb = [t for t in range(T) if mask[a, t]], [t for t in range(T) if mask[b, t]]
                m = min(len(ra), len(rb))
                ta, tb = ra[:m], rb[:m]
            d = [Levenshtein.distance(ref_token_seq(ids[a, x], E), ref_token_seq(ids[b, y], E)) for x, y in zip(ta, tb)]
            per_pair.append((np.mean(d), np.mean(d) / (L * k + L - 1)))
        return np.mean([x for x, _ in per_pair]), np.mean([y for _, y in per_pair])

    for align in ("position", "prefix"):
        got = pw.token_pathway_distance(ids, mask, E, align=align)
        want = ref(align)
        assert got.num_pairs == 10
        assert got.mean == pytest.approx(want[0]) and got.mean_normalised == pytest.approx(want[1])
    # Text encoding goes through the same alignment.
    txt = pw.token_pathway_distance(ids, mask, E, encoding="text")
    assert txt.mean > 0


def test_token_and_position_pathways():
    ids = np.array([[[[3, 1], [0, 2]], [[5, 4], [6, 7]]]])  # N=1, T=2, L=2, k=2
    mask = np.array([[True, False]])
    assert pw.token_pathways(ids, 8)[0][1].tolist() == [5, 4, 8, 6, 7]
    assert pw.token_pathways(ids, 8, encoding="text")[0][0] == "3,1-0,2"
    assert pw.position_pathways(ids, mask, 0, 8)[0].tolist() == [3, 1, 8, 0, 2]
    with pytest.raises(pw.PathwayError, match="padding"):
        pw.position_pathways(ids, mask, 1, 8)
    two = np.concatenate([ids, ids[:, ::-1]])
    got = pw.position_pathways(two, np.ones((2, 2), bool), np.array([0, 1]), 8, encoding="text")
    assert got == ["3,1-0,2", "3,1-0,2"]


# ---------------------------------------------------------------------------------------------------------------
# Saturation


def test_saturation_hand_worked():
    uniform = np.full((3, 2, 4), 0.25)
    s = pw.saturation(uniform, tau=0.7)
    assert s.kept_L.tolist() == [3.0, 3.0] and s.mean_kept == 3.0  # 0.25, 0.5, 0.75 >= 0.7
    np.testing.assert_allclose(s.entropy_L, math.log(4))
    np.testing.assert_allclose(s.top1_weight_L, 0.25)
    assert s.saturated and "2 experts" in s.rule

    peaked = np.tile(np.array([0.9, 0.05, 0.03, 0.02]), (2, 3, 1))
    s = pw.saturation(peaked)
    h = -sum(x * math.log(x) for x in (0.9, 0.05, 0.03, 0.02))
    np.testing.assert_allclose(s.entropy_L, h)
    np.testing.assert_allclose(s.top1_weight_L, 0.9)
    assert s.mean_kept == 1.0 and not s.saturated
    zero = np.zeros((1, 1, 4))
    zero[0, 0, 0] = 1.0
    assert pw.saturation(zero).entropy_L[0] == 0.0  # 0 log 0 = 0, no NaN


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("call, match", [
    (lambda: pw.tau_rule(np.ones((2, 3))), r"\[N, L, E\]"),
    (lambda: pw.tau_rule(np.ones((1, 2, 3))), "sums to 3"),
    (lambda: pw.tau_rule(np.full((1, 1, 2), np.nan)), "NaN"),
    (lambda: pw.tau_rule(np.full((1, 1, 2), 1, int)), "floating"),
    (lambda: pw.tau_rule(np.full((1, 1, 2), 0.5), tau=0.0), "tau"),
    (lambda: pw.encode_pathways(np.full((1, 1, 2), 0.5), encoding="chars"), "encoding"),
    (lambda: pw.pathway_distance(np.full((1, 1, 2), 0.5)), "at least 2 samples"),
    (lambda: pw.token_pathway_distance(np.zeros((2, 3, 1, 1), int), np.ones((2, 4), bool), 4), "token_mask"),
    (lambda: pw.token_pathway_distance(np.full((2, 3, 1, 1), 5), np.ones((2, 3), bool), 4), r"\[0, 4\)"),
    (lambda: pw.token_pathway_distance(np.zeros((2, 3, 1, 1), int), np.ones((2, 3), bool), 4, align="left"),
     "align"),
    (lambda: pw.token_pathway_distance(np.zeros((2, 2, 1, 1), int), np.array([[1, 0], [0, 1]], bool), 4),
     "no pair"),
    (lambda: pw.mean_cross_distance([], ["a"]), "both groups"),
])
def test_bad_input_raises_named_errors(call, match):
    with pytest.raises(pw.PathwayError, match=match) as e:
        call()
    assert isinstance(e.value, MoegrokError)
