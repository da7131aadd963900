"""Pathway consistency S, C, R (METHOD §5) against a float64 NumPy reference and hand-worked cases."""
import numpy as np
import pytest

from moegrok.analysis.consistency import (MAX_COS_FLOOR, consistency_caveat, consistency_undefined_reason,
                                          pathway_consistency)
from moegrok.errors import MoegrokError


def reference(g_NxLxE, W_LxExD):
    """Straight from METHOD §5: materialise e_il, cosines of adjacent layers, the three formulas."""
    e = np.einsum("nle,led->nld", g_NxLxE.astype(np.float64), W_LxExD.astype(np.float64))
    S, C, R = [], [], []
    for i in range(e.shape[0]):
        c = [e[i, l] @ e[i, l + 1] / (np.linalg.norm(e[i, l]) * np.linalg.norm(e[i, l + 1]))
             for l in range(e.shape[1] - 1)]
        r = sum(c) / len(c)
        R.append(r)
        if max(c) > MAX_COS_FLOOR:
            S.append(r / (max(c) + 1e-8))
            C.append(1 - S[-1])
        else:
            S.append(np.nan)
            C.append(np.nan)
    return np.array(S), np.array(C), np.array(R)


def test_hand_worked_identity_router():
    W = np.stack([np.eye(2)] * 3)  # e_il = g_il
    g = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],   # c = [1, 0]: R = 0.5, S = 0.5 / 1
                  [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # c = [0, 0]: S n/a, R = 0
    out = pathway_consistency(g, W)
    np.testing.assert_allclose(out.cos_BxNxLm1, [[1, 0], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(out.R_BxN, [0.5, 0.0], atol=1e-6)
    assert out.S_BxN[0] == pytest.approx(0.5, abs=1e-6) and out.C_BxN[0] == pytest.approx(0.5, abs=1e-6)
    assert np.isnan(out.S_BxN[1]) and np.isnan(out.C_BxN[1])
    assert out.s_defined_BxN.tolist() == [True, False]
    assert out.num_s_undefined == 1 and "1 of 2" in out.undefined_reason()


@pytest.mark.parametrize("L", [2, 3, 5])
def test_matches_numpy_reference_batched(L):
    rng = np.random.default_rng(L)
    B, N, E, d = 3, 17, 6, 9
    logits = rng.normal(size=(B, N, L, E)) * 2
    g = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    W = rng.normal(size=(B, L, E, d)) + 0.8 * rng.normal(size=(1, 1, E, d))  # correlated layers: many S defined
    out = pathway_consistency(g, W)
    assert out.S_BxN.shape == (B, N)
    for b in range(B):
        S, C, R = reference(g[b], W[b])
        np.testing.assert_allclose(out.R_BxN[b], R, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.isnan(out.S_BxN[b]), np.isnan(S))
        np.testing.assert_allclose(out.S_BxN[b], S, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.C_BxN[b], C, rtol=1e-4, atol=1e-5)
    assert out.s_defined_BxN.any()
    single = pathway_consistency(g[1], W[1])
    np.testing.assert_allclose(single.R_BxN, out.R_BxN[1], rtol=1e-6)


def test_negative_cosines_are_na_not_wild():
    # Anti-aligned adjacent layers: max c < 0, where the paper's ratio would swing; S must be n/a, R defined.
    W = np.stack([np.eye(2), -np.eye(2), np.eye(2)])
    g = np.array([[[0.7, 0.3]] * 3])
    out = pathway_consistency(g, W)
    assert out.R_BxN[0] == pytest.approx(-1.0, abs=1e-6)
    assert np.isnan(out.S_BxN[0])


def test_zero_router_gives_zero_cosine_not_nan():
    g = np.full((2, 3, 4), 0.25)
    out = pathway_consistency(g, np.zeros((3, 4, 5)))
    assert np.all(out.R_BxN == 0) and not out.s_defined_BxN.any()


def test_one_layer_is_undefined_with_reason():
    assert "at least 2 MoE layers" in consistency_undefined_reason(1)
    assert consistency_undefined_reason(3) is None
    assert "no information" in consistency_caveat(2)
    with pytest.raises(MoegrokError, match="at least 2 MoE layers"):
        pathway_consistency(np.full((4, 1, 3), 1 / 3), np.ones((1, 3, 2)))


def test_bad_shapes_and_nan_raise():
    with pytest.raises(MoegrokError, match="does not match"):
        pathway_consistency(np.ones((2, 3, 4)), np.ones((3, 5, 2)))
    g = np.ones((2, 3, 4)) / 4
    g[0, 0, 0] = np.nan
    with pytest.raises(MoegrokError, match="NaN"):
        pathway_consistency(g, np.ones((3, 4, 2)))
