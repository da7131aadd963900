"""Routing kernel, effective dimension and the complexity-reduced bound (METHOD §7).

Model: ``F(θ, x) = Σ_k g_k(x) f_k(φ_k, x)`` with a frozen router. Its NTK is the routing kernel
``Θ(x, x') = Σ_k g_k(x) g_k(x') K_k(x, x')``; on n samples that is ``H = Σ_k (g_k g_kᵀ) ∘ K_k``.

Everything spectral is computed in float64 from one validated eigendecomposition of H: d_eff, the bias term and
kernel ridge regression all reduce to filters ``μ/(μ+λ)``, ``λ/(μ+λ)`` and ``1/(μ+λ)`` on H's eigenvalues, which
gives them well-defined limits at λ = 0 (a singular H yields its rank, the null-space part of y, the minimum-norm
interpolant) instead of a failed solve.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import scipy.linalg

from moegrok.errors import MoegrokError

# Relative tolerances on H (scaled by its largest |eigenvalue| and n): asymmetry or negative eigenvalues beyond these
# mean the input is not a kernel Gram matrix, below them they are float round-off and are removed.
SYM_RTOL = 1e-8
PSD_RTOL = 1e-6


class TheoryError(MoegrokError, ValueError):
    """Bad input to a theory computation (shapes, non-finite values, negative λ, a non-PSD kernel...)."""


def _as_f64(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise TheoryError(f"{name} contains NaN or inf (shape {arr.shape})")
    return arr


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise TheoryError(f"ridge λ must be a finite number >= 0, got {lam}")
    return lam


def routing_kernel(g: Any, K: Any) -> np.ndarray:
    """``H [n, n] = Σ_k (g_k g_kᵀ) ∘ K_k`` for routing weights ``g [n, E]`` and per-expert kernels ``K [E, n, n]``.

    Computed in float64 by a jitted JAX contraction. Rows of g need not sum to 1 (top-k gates of OLMoE do not),
    but must be in [0, 1]; each K_k must be symmetric (it is checked; PSD is checked where H is decomposed).
    """
    import jax
    import jax.numpy as jnp

    g_NxE = _as_f64(g, "routing weights g")
    K_ExNxN = _as_f64(K, "expert kernels K")
    if g_NxE.ndim != 2:
        raise TheoryError(f"routing weights g must have shape [n, E], got {g_NxE.shape}")
    n, E = g_NxE.shape
    if n == 0 or E == 0:
        raise TheoryError(f"routing weights g must be non-empty, got shape {g_NxE.shape}")
    if K_ExNxN.shape != (E, n, n):
        raise TheoryError(f"expert kernels K must have shape [E, n, n] = [{E}, {n}, {n}] to match g, "
                          f"got {K_ExNxN.shape}")
    if g_NxE.min() < -1e-12 or g_NxE.max() > 1 + 1e-12:
        raise TheoryError(f"routing weights g must lie in [0, 1], got range [{g_NxE.min()}, {g_NxE.max()}]")
    scale = max(float(np.abs(K_ExNxN).max()), 1e-300)
    asym = float(np.abs(K_ExNxN - K_ExNxN.transpose(0, 2, 1)).max())
    if asym > SYM_RTOL * scale * max(n, 1):
        raise TheoryError(f"expert kernels K are not symmetric: max |K_k - K_kᵀ| = {asym:.3g} (scale {scale:.3g})")
    with jax.enable_x64(True):
        g = jnp.asarray(g_NxE)
        H = np.asarray(_routing_kernel_compiled()(g, g, jnp.asarray(K_ExNxN)))
    return 0.5 * (H + H.T)  # exact symmetry, so eigh and equality checks see the same matrix


def routing_cross_kernel(g_a: Any, g_b: Any, K_cross: Any) -> np.ndarray:
    """``Θ [m, n]`` between points a (routing ``g_a [m, E]``) and b (``g_b [n, E]``) from per-expert cross kernels
    ``K_cross [E, m, n]``: ``Θ_ij = Σ_k g_a[i,k] g_b[j,k] K_k(a_i, b_j)`` (e.g. test-vs-train, for predictions)."""
    ga = _as_f64(g_a, "routing weights g_a")
    gb = _as_f64(g_b, "routing weights g_b")
    Kc = _as_f64(K_cross, "cross kernels K_cross")
    if ga.ndim != 2 or gb.ndim != 2 or ga.shape[1] != gb.shape[1]:
        raise TheoryError(f"routing weights must be [m, E] and [n, E] with the same E, got {ga.shape}, {gb.shape}")
    if Kc.shape != (ga.shape[1], ga.shape[0], gb.shape[0]):
        raise TheoryError(f"cross kernels must have shape [E, m, n] = [{ga.shape[1]}, {ga.shape[0]}, "
                          f"{gb.shape[0]}], got {Kc.shape}")
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        return np.asarray(_routing_kernel_compiled()(jnp.asarray(ga), jnp.asarray(gb), jnp.asarray(Kc)))


def _routing_kernel_impl(ga_MxE, gb_NxE, K_ExMxN):
    import jax
    import jax.numpy as jnp

    # A scan over experts keeps the working set at one [m, n] matrix instead of an [E, m, n] temporary.
    def step(H, k_slice):
        ga_M, gb_N, K_MxN = k_slice
        return H + jnp.outer(ga_M, gb_N) * K_MxN, None

    H0 = jnp.zeros(K_ExMxN.shape[1:], K_ExMxN.dtype)
    H, _ = jax.lax.scan(step, H0, (ga_MxE.T, gb_NxE.T, K_ExMxN))
    return H


@functools.cache
def _routing_kernel_compiled():
    import jax  # imported on first use so `moegrok --help` stays fast

    return jax.jit(_routing_kernel_impl)


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Validated eigendecomposition of a kernel Gram matrix: ``H = U diag(mu) Uᵀ``, mu >= 0, numerical zeros = 0."""

    mu: np.ndarray  # [n], ascending
    U: np.ndarray  # [n, n], columns are eigenvectors

    @property
    def n(self) -> int:
        return int(self.mu.shape[0])

    @property
    def rank(self) -> int:
        return int(np.count_nonzero(self.mu))


def kernel_spectrum(H: Any, name: str = "H") -> Spectrum:
    """Check that H is a symmetric PSD [n, n] matrix (to tolerance) and decompose it in float64."""
    H_NxN = _as_f64(H, name)
    if H_NxN.ndim != 2 or H_NxN.shape[0] != H_NxN.shape[1]:
        raise TheoryError(f"{name} must be a square [n, n] matrix, got shape {H_NxN.shape}")
    n = H_NxN.shape[0]
    if n == 0:
        raise TheoryError(f"{name} is empty (0 samples): effective dimension and bound need n >= 1")
    scale = float(np.abs(H_NxN).max())
    asym = float(np.abs(H_NxN - H_NxN.T).max())
    if asym > SYM_RTOL * max(scale, 1e-300) * n:
        raise TheoryError(f"{name} is not symmetric: max |H - Hᵀ| = {asym:.3g} (max |H| = {scale:.3g})")
    mu, U = scipy.linalg.eigh(0.5 * (H_NxN + H_NxN.T))
    top = max(float(np.abs(mu).max()), 0.0)
    if mu[0] < -PSD_RTOL * top * n:
        raise TheoryError(f"{name} is not positive semi-definite: smallest eigenvalue {mu[0]:.3g} "
                          f"vs largest {top:.3g} (a kernel Gram matrix has none below 0)")
    # Like numpy.linalg.matrix_rank: eigenvalues within round-off of 0 are 0, so λ = 0 gives the rank, not noise.
    tol = top * n * np.finfo(np.float64).eps
    mu = np.where(mu <= tol, 0.0, mu)
    return Spectrum(mu=mu, U=U)


def _spectrum(H: Any) -> Spectrum:
    return H if isinstance(H, Spectrum) else kernel_spectrum(H)


def _safe_ratio(num: np.ndarray, den: np.ndarray, at_zero: float) -> np.ndarray:
    """num/den elementwise with 0/0 := `at_zero` (the λ → 0⁺ limit of the filter)."""
    out = np.full(num.shape, at_zero, dtype=np.float64)
    nz = den > 0
    out[nz] = num[nz] / den[nz]
    return out


def effective_dimension(H: Any, lam: float) -> float:
    """``d_eff(λ) = Tr(H (H + λI)⁻¹) = Σ_i μ_i / (μ_i + λ)``; at λ = 0 this is rank(H) (the λ → 0⁺ limit).

    `H` is an [n, n] kernel Gram matrix (or a :class:`Spectrum` of one, to reuse a decomposition over many λ).
    """
    lam = _check_lam(lam)
    s = _spectrum(H)
    return float(_safe_ratio(s.mu, s.mu + lam, at_zero=0.0).sum())


def feature_effective_dimension(Phi: Any, lam: float) -> float:
    """d_eff of ``H = Φ Φᵀ`` from features ``Φ [n, p]`` without forming H when p < n.

    H and ``ΦᵀΦ`` share their non-zero eigenvalues, so the smaller Gram matrix gives the same d_eff; for a routing
    Gram ``G Gᵀ`` over thousands of samples this is an [E, E] problem instead of an [n, n] one.
    """
    P = _as_f64(Phi, "features Φ")
    if P.ndim != 2 or P.shape[0] == 0:
        raise TheoryError(f"features Φ must be [n, p] with n >= 1, got shape {P.shape}")
    gram = P.T @ P if P.shape[1] < P.shape[0] else P @ P.T
    return effective_dimension(gram, lam)


def _check_y(y: Any, n: int, name: str = "y") -> np.ndarray:
    y_N = _as_f64(y, name)
    if y_N.shape != (n,):
        raise TheoryError(f"{name} must have shape [n] = [{n}] to match H, got {y_N.shape}")
    return y_N


def bias_term(H: Any, y: Any, lam: float) -> float:
    """``(λ²/n) yᵀ (H + λI)⁻² y``; at λ = 0, ``‖P_null(H) y‖² / n`` (the λ → 0⁺ limit)."""
    lam = _check_lam(lam)
    s = _spectrum(H)
    y_N = _check_y(y, s.n)
    proj = s.U.T @ y_N
    shrink = _safe_ratio(np.full(s.n, lam), s.mu + lam, at_zero=1.0)
    return float(np.sum((shrink * proj) ** 2) / s.n)


def _check_pos(v: float, name: str) -> float:
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise TheoryError(f"{name} must be a finite number >= 0, got {v}")
    return v


def variance_term(d_eff: float, n: int, sigma2: float) -> float:
    """``σ² d_eff / n``."""
    if int(n) < 1:
        raise TheoryError(f"number of samples n must be >= 1, got {n}")
    return _check_pos(sigma2, "noise variance σ²") * _check_pos(d_eff, "d_eff") / int(n)


def confidence_term(n: int, sigma2: float, delta: float) -> float:
    """``σ² log(1/δ) / n`` for confidence level 1 − δ, δ in (0, 1)."""
    if int(n) < 1:
        raise TheoryError(f"number of samples n must be >= 1, got {n}")
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise TheoryError(f"confidence parameter δ must be in (0, 1), got {delta}")
    return _check_pos(sigma2, "noise variance σ²") * math.log(1.0 / delta) / int(n)


@dataclasses.dataclass(frozen=True)
class BoundTerms:
    """The bound ``E[(F − f*)²] <= C1·bias + C2·(variance + confidence)`` with every ingredient named."""

    n: int
    lam: float
    sigma2: float
    delta: float
    C1: float
    C2: float
    d_eff: float
    bias: float  # (λ²/n) yᵀ(H+λI)⁻²y, before C1
    variance: float  # σ² d_eff / n, before C2
    confidence: float  # σ² log(1/δ) / n, before C2
    total: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def complexity_bound(H: Any, y: Any, lam: float, sigma2: float, delta: float = 0.05,
                     C1: float = 1.0, C2: float = 1.0) -> BoundTerms:
    """All terms of METHOD §7's bound for Gram matrix `H` [n, n] (or its Spectrum) and labels `y` [n]."""
    s = _spectrum(H)
    C1, C2 = _check_pos(C1, "constant C1"), _check_pos(C2, "constant C2")
    d = effective_dimension(s, lam)
    b = bias_term(s, y, lam)
    v = variance_term(d, s.n, sigma2)
    c = confidence_term(s.n, sigma2, delta)
    return BoundTerms(n=s.n, lam=float(lam), sigma2=float(sigma2), delta=float(delta), C1=C1, C2=C2, d_eff=d,
                      bias=b, variance=v, confidence=c, total=C1 * b + C2 * (v + c))


def kernel_ridge_fit(H: Any, y: Any, lam: float) -> np.ndarray:
    """Dual coefficients ``α = (H + λI)⁻¹ y`` [n]; at λ = 0 the minimum-norm interpolant ``H⁺ y``.

    Predictions at new points: ``K_cross [m, n] @ α`` (see :func:`kernel_ridge_predict`); in-sample: ``H @ α``.
    """
    lam = _check_lam(lam)
    s = _spectrum(H)
    y_N = _check_y(y, s.n)
    inv = _safe_ratio(np.ones(s.n), s.mu + lam, at_zero=0.0)
    return s.U @ (inv * (s.U.T @ y_N))


def kernel_ridge_predict(K_cross: Any, alpha: Any) -> np.ndarray:
    """``K_cross [m, n] @ α [n]`` -> predictions [m]."""
    Kc = _as_f64(K_cross, "cross kernel K_cross")
    a = _as_f64(alpha, "dual coefficients α")
    if Kc.ndim != 2 or a.ndim != 1 or Kc.shape[1] != a.shape[0]:
        raise TheoryError(f"cross kernel must be [m, n] with n = len(α) = {a.shape}, got {Kc.shape}")
    return Kc @ a


def relative_lambda(H: Any, lam_rel: float) -> float:
    """``λ = lam_rel · Tr(H) / n``: a ridge on H's own scale, so d_eff compares spectral shape, not magnitude."""
    H_NxN = _as_f64(H, "H")
    lam_rel = _check_lam(lam_rel)
    n = H_NxN.shape[0]
    if n == 0:
        raise TheoryError("H is empty (0 samples)")
    return lam_rel * float(np.trace(H_NxN)) / n
