"""Routing kernel, effective dimension, bound terms, KRR and the empirical NTK against independent references:
hand-computed 2×2 / 3×3 cases, NumPy eigen/solve formulas, and per-sample gradients written out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moegrok.theory as theory
from moegrok.errors import MoegrokError
from moegrok.theory.kernel import (bias_term, complexity_bound, confidence_term, feature_effective_dimension,
                                   kernel_ridge_fit, kernel_ridge_predict, relative_lambda, routing_cross_kernel,
                                   variance_term)
from moegrok.theory.ntk import empirical_ntk, init_relu_experts, moe_apply, relu_expert_apply, relu_expert_kernels


def _random_psd(rng, n, rank=None):
    A = rng.standard_normal((n, rank or n))
    return A @ A.T


def _ref_routing_kernel(g, K):
    n, E = g.shape
    H = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            H[i, j] = sum(g[i, k] * g[j, k] * K[k, i, j] for k in range(E))
    return H


def _ref_deff(H, lam):
    n = H.shape[0]
    return float(np.trace(H @ np.linalg.solve(H + lam * np.eye(n), np.eye(n))))


def _ref_bias(H, y, lam):
    n = H.shape[0]
    v = np.linalg.solve(H + lam * np.eye(n), y)
    return lam ** 2 / n * float(v @ v)


# --- public names -------------------------------------------------------------------------------------------------


def test_public_names():
    from moegrok.theory.kernel import effective_dimension, routing_kernel

    assert theory.routing_kernel is routing_kernel
    assert theory.effective_dimension is effective_dimension


# --- hand-computed cases ------------------------------------------------------------------------------------------


def test_routing_kernel_2x2_by_hand():
    g = np.array([[1.0, 0.0], [0.5, 0.5]])
    K = np.array([[[2.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 3.0]]])
    # H_00 = 1·1·2, H_01 = 1·0.5·1 + 0·0.5·0, H_11 = 0.25·2 + 0.25·3
    np.testing.assert_allclose(theory.routing_kernel(g, K), [[2.0, 0.5], [0.5, 1.25]], atol=1e-15)


def test_deff_and_bias_2x2_by_hand():
    H = np.array([[2.0, 0.5], [0.5, 1.25]])  # eigenvalues 2.25 and 1 (trace 3.25, det 2.25)
    assert theory.effective_dimension(H, 1.0) == pytest.approx(2.25 / 3.25 + 1 / 2, rel=1e-14)  # 31/26
    # (H+I)^-1 (1,0) = (2.25, -0.5)/6.5, squared norm 5.3125/42.25, times λ²/n = 1/2
    assert bias_term(H, [1.0, 0.0], 1.0) == pytest.approx(85 / 1352, rel=1e-13)


def test_deff_bias_3x3_diagonal_by_hand():
    H = np.diag([1.0, 2.0, 3.0])
    assert theory.effective_dimension(H, 1.0) == pytest.approx(1 / 2 + 2 / 3 + 3 / 4, rel=1e-14)
    assert bias_term(H, [1.0, 1.0, 1.0], 1.0) == pytest.approx((1 / 4 + 1 / 9 + 1 / 16) / 3, rel=1e-14)


def test_bound_terms_by_hand():
    H = np.diag([1.0, 2.0, 3.0])
    b = complexity_bound(H, [1.0, 1.0, 1.0], lam=1.0, sigma2=0.5, delta=0.1, C1=2.0, C2=3.0)
    d = 23 / 12
    assert b.d_eff == pytest.approx(d)
    assert b.variance == pytest.approx(0.5 * d / 3)
    assert b.confidence == pytest.approx(0.5 * math.log(10) / 3)
    assert b.bias == pytest.approx(61 / 432)
    assert b.total == pytest.approx(2 * 61 / 432 + 3 * (0.5 * d / 3 + 0.5 * math.log(10) / 3))
    assert (b.C1, b.C2, b.n) == (2.0, 3.0, 3)
    assert variance_term(d, 3, 0.5) == pytest.approx(b.variance)
    assert confidence_term(3, 0.5, 0.1) == pytest.approx(b.confidence)


# --- random cases against NumPy references -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_numpy(seed):
    rng = np.random.default_rng(seed)
    n, E = 9, 4
    g = rng.dirichlet(np.ones(E), size=n)
    K = np.stack([_random_psd(rng, n) for _ in range(E)])
    H = theory.routing_kernel(g, K)
    np.testing.assert_allclose(H, _ref_routing_kernel(g, K), rtol=1e-12, atol=1e-12)
    assert np.array_equal(H, H.T)
    assert np.linalg.eigvalsh(H).min() >= -1e-10 * np.abs(H).max()
    y = rng.standard_normal(n)
    for lam in (1e-3, 0.3, 10.0):
        assert theory.effective_dimension(H, lam) == pytest.approx(_ref_deff(H, lam), rel=1e-10)
        assert bias_term(H, y, lam) == pytest.approx(_ref_bias(H, y, lam), rel=1e-9)
        alpha = kernel_ridge_fit(H, y, lam)
        np.testing.assert_allclose(alpha, np.linalg.solve(H + lam * np.eye(n), y), rtol=1e-8, atol=1e-10)
        Kc = rng.standard_normal((3, n))
        np.testing.assert_allclose(kernel_ridge_predict(Kc, alpha), Kc @ alpha)


def test_cross_kernel_against_loop():
    rng = np.random.default_rng(3)
    ga, gb = rng.dirichlet(np.ones(3), size=4), rng.dirichlet(np.ones(3), size=5)
    Kc = rng.standard_normal((3, 4, 5))
    ref = np.array([[sum(ga[i, k] * gb[j, k] * Kc[k, i, j] for k in range(3)) for j in range(5)] for i in range(4)])
    np.testing.assert_allclose(routing_cross_kernel(ga, gb, Kc), ref, rtol=1e-12)


@pytest.mark.parametrize("n,p", [(12, 3), (4, 9)])
def test_feature_deff_equals_gram_deff(n, p):
    rng = np.random.default_rng(n)
    Phi = rng.standard_normal((n, p))
    assert feature_effective_dimension(Phi, 0.7) == pytest.approx(_ref_deff(Phi @ Phi.T, 0.7), rel=1e-10)


def test_relative_lambda():
    H = np.diag([1.0, 2.0, 3.0])
    assert relative_lambda(H, 0.5) == pytest.approx(0.5 * 6 / 3)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), E=st.integers(1, 4), seed=st.integers(0, 10_000),
       lam=st.floats(1e-6, 1e3))
def test_properties_deff_bounds_and_monotone(n, E, seed, lam):
    rng = np.random.default_rng(seed)
    g = rng.dirichlet(np.ones(E), size=n)
    K = np.stack([_random_psd(rng, n, rank=rng.integers(1, n + 1)) for _ in range(E)])
    H = theory.routing_kernel(g, K)
    d1, d2 = theory.effective_dimension(H, lam), theory.effective_dimension(H, 2 * lam)
    assert 0.0 <= d2 <= d1 <= n + 1e-9
    assert math.isfinite(bias_term(H, rng.standard_normal(n), lam))


# --- degenerate input: defined limits, never NaN -----------------------------------------------------------------


def test_lambda_zero_singular_gives_rank_and_null_space_limit():
    H = np.ones((2, 2))  # rank 1, null space spanned by (1, -1)
    assert theory.effective_dimension(H, 0.0) == pytest.approx(1.0)
    assert theory.effective_dimension(H, 1e-12) == pytest.approx(1.0, abs=1e-9)  # continuous at 0+
    assert bias_term(H, [1.0, -1.0], 0.0) == pytest.approx(1.0)  # ‖P_null y‖² / n = 2 / 2
    assert bias_term(H, [1.0, 1.0], 0.0) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(kernel_ridge_fit(H, [1.0, 3.0], 0.0), np.linalg.pinv(H) @ [1.0, 3.0], atol=1e-12)


def test_identical_routing_and_zero_kernel_and_one_sample():
    g = np.tile([0.25, 0.75], (4, 1))  # every sample routed identically
    K = np.stack([np.ones((4, 4)), 2 * np.ones((4, 4))])
    H = theory.routing_kernel(g, K)
    mu = 4 * (0.25 ** 2 + 2 * 0.75 ** 2)  # rank one: H = c·11ᵀ with c = Σ g_k² K_k
    assert theory.effective_dimension(H, 0.5) == pytest.approx(mu / (mu + 0.5))
    Z = np.zeros((3, 3))
    assert theory.effective_dimension(Z, 0.0) == 0.0
    assert bias_term(Z, [1.0, 2.0, 2.0], 0.1) == pytest.approx(9 / 3)
    one = np.array([[4.0]])
    assert theory.effective_dimension(one, 1.0) == pytest.approx(0.8)
    assert bias_term(one, [2.0], 1.0) == pytest.approx(4 / 25)


@pytest.mark.parametrize("call, match", [
    (lambda: theory.effective_dimension(np.eye(2), -1.0), "λ"),
    (lambda: theory.effective_dimension(np.array([[1.0, np.nan], [np.nan, 1.0]]), 1.0), "NaN"),
    (lambda: theory.effective_dimension(np.array([[1.0, 2.0], [0.0, 1.0]]), 1.0), "not symmetric"),
    (lambda: theory.effective_dimension(np.array([[0.0, 1.0], [1.0, 0.0]]), 1.0), "positive semi-definite"),
    (lambda: theory.effective_dimension(np.zeros((0, 0)), 1.0), "empty"),
    (lambda: theory.effective_dimension(np.ones(3), 1.0), "square"),
    (lambda: theory.routing_kernel(np.ones((2, 2)) / 2, np.ones((3, 2, 2))), r"\[E, n, n\]"),
    (lambda: theory.routing_kernel(np.array([[1.5, -0.5]]), np.ones((2, 1, 1))), r"\[0, 1\]"),
    (lambda: bias_term(np.eye(2), [1.0], 1.0), "shape"),
    (lambda: confidence_term(3, 1.0, 1.0), "δ"),
    (lambda: variance_term(1.0, 0, 1.0), "n must"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(MoegrokError, match=match):
        call()


# --- empirical NTK vs per-sample gradients written out by hand --------------------------------------------------


def _relu_jacobian(W, a, X):
    """Per-sample gradient of f(x) = (1/√m) Σ_r a_r relu(w_r·x): d/dW_r = a_r 1[w_r·x > 0] x / √m,
    d/da_r = relu(w_r·x) / √m; flattened as (W, a) in that order."""
    m = a.shape[0]
    pre = X @ W.T
    dW = (a * (pre > 0))[:, :, None] * X[:, None, :] / math.sqrt(m)
    da = np.maximum(pre, 0) / math.sqrt(m)
    return np.concatenate([dW.reshape(len(X), -1), da], axis=1)


@pytest.mark.parametrize("chunk, max_bytes", [(3, 1 << 30), (3, 0), (64, 1 << 30)])
def test_relu_ntk_against_hand_gradients(chunk, max_bytes):
    rng = np.random.default_rng(0)
    ex = init_relu_experts(rng, 2, 6, 4)
    X, X2 = rng.standard_normal((7, 4)), rng.standard_normal((5, 4))
    J, J2 = _relu_jacobian(ex.W[1], ex.a[1], X), _relu_jacobian(ex.W[1], ex.a[1], X2)
    K = empirical_ntk(relu_expert_apply, (ex.W[1], ex.a[1]), X, chunk_size=chunk, max_jacobian_bytes=max_bytes)
    np.testing.assert_allclose(K, J @ J.T, rtol=1e-12, atol=1e-12)
    Kc = empirical_ntk(relu_expert_apply, (ex.W[1], ex.a[1]), X, X2, chunk_size=chunk, max_jacobian_bytes=max_bytes)
    np.testing.assert_allclose(Kc, J @ J2.T, rtol=1e-12, atol=1e-12)
    assert K.dtype == np.float64


def _tanh_model(p, x):
    import jax.numpy as jnp

    return p["b"] * jnp.tanh(jnp.dot(p["w"], x)) + p["c"][0] * x[0]


def test_empirical_ntk_pytree_against_hand_gradients():
    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal(3), "b": np.float64(0.7), "c": np.array([0.2])}
    X = rng.standard_normal((4, 3))
    t = np.tanh(X @ p["w"])
    J = np.concatenate([t[:, None], X[:, :1], (p["b"] * (1 - t ** 2))[:, None] * X], axis=1)  # leaves b, c, w
    np.testing.assert_allclose(empirical_ntk(_tanh_model, p, X, chunk_size=3), J @ J.T, rtol=1e-12)


def _moe_single(params, xg):
    W, a, E = params[0], params[1], params[0].shape[0]
    x, g = xg[:-E], xg[-E:]
    return moe_apply((W, a), g[None, :], x[None, :])[0]


def test_ntk_of_moe_is_routing_kernel():
    """METHOD §7: the NTK of F = Σ_k g_k f_k w.r.t. all expert parameters, router frozen, is Σ_k g_k g_kᵀ ∘ K_k."""
    rng = np.random.default_rng(2)
    E, D, n = 3, 4, 6
    ex = init_relu_experts(rng, E, 8, D)
    X, g = rng.standard_normal((n, D)), rng.dirichlet(np.ones(E), size=n)
    full = empirical_ntk(_moe_single, (ex.W, ex.a), np.concatenate([X, g], axis=1))
    K = np.stack([_relu_jacobian(ex.W[k], ex.a[k], X) @ _relu_jacobian(ex.W[k], ex.a[k], X).T for k in range(E)])
    np.testing.assert_allclose(theory.routing_kernel(g, K), full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(relu_expert_kernels(ex, X), K, rtol=1e-12, atol=1e-12)


def test_paired_init_is_zero_function():
    rng = np.random.default_rng(4)
    ex = init_relu_experts(rng, 3, 10, 5)
    out = moe_apply((ex.W, ex.a), rng.dirichlet(np.ones(3), size=7), rng.standard_normal((7, 5)))
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-6)
    with pytest.raises(MoegrokError, match="even"):
        init_relu_experts(rng, 2, 5, 3)
