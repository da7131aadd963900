"""Empirical NTK Gram matrices by JAX autodiff, and the one-hidden-layer ReLU expert used by the synthetic study.

``K(x, x') = ⟨∇_φ f(φ, x), ∇_φ f(φ, x')⟩``. Per-sample gradients are computed for `chunk_size` samples at a time
(vmap of grad), flattened to a [chunk, P] Jacobian block, and K is assembled block by block, so memory is bounded
by ``max_jacobian_bytes`` (all blocks cached) or two blocks (recomputed), never by an [n, n, P] tensor.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from moegrok.theory.kernel import TheoryError

DEFAULT_MAX_JACOBIAN_BYTES = 1 << 30


@functools.cache
def _jacobian_fn(apply_fn: Callable):
    import jax
    import jax.numpy as jnp

    def flat_grad(params, x_D):
        grads = jax.grad(apply_fn)(params, x_D)
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(grads)])

    return jax.jit(jax.vmap(flat_grad, in_axes=(None, 0)))


@functools.cache
def _gram_fn():
    import jax

    # In XLA rather than NumPy: NumPy's OpenBLAS threads contend with JAX's on a small shared CPU (see _blas).
    return jax.jit(lambda A, B: A @ B.T)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def empirical_ntk(apply_fn: Callable[[Any, Any], Any], params: Any, x_NxD: Any, x2_MxD: Any | None = None, *,
                  chunk_size: int = 64, max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES) -> np.ndarray:
    """Empirical NTK ``K [N, M]`` of a scalar function ``apply_fn(params, x_D) -> ()`` in float64.

    `apply_fn` must be a module-level (hashable, stable) function: its compiled Jacobian is cached per function.
    With ``x2_MxD=None`` the result is the symmetric Gram matrix on `x_NxD`.
    """
    import jax
    import jax.numpy as jnp

    if chunk_size < 1:
        raise TheoryError(f"chunk_size must be >= 1, got {chunk_size}")
    x = np.asarray(x_NxD, dtype=np.float64)
    x2 = x if x2_MxD is None else np.asarray(x2_MxD, dtype=np.float64)
    for name, a in (("x", x), ("x2", x2)):
        if a.ndim < 2 or a.shape[0] == 0:
            raise TheoryError(f"NTK inputs {name} must be [n, ...] with n >= 1, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise TheoryError(f"NTK inputs {name} contain NaN or inf")
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        num_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params64))
        jac = _jacobian_fn(apply_fn)
        size = min(chunk_size, max(x.shape[0], x2.shape[0]))

        def block(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
            # Pad to a fixed chunk shape so the jitted Jacobian compiles once.
            xs = np.zeros((size,) + a.shape[1:], np.float64)
            xs[: hi - lo] = a[lo:hi]
            return jac(params64, jnp.asarray(xs))[: hi - lo]

        rows, cols = _chunks(x.shape[0], size), _chunks(x2.shape[0], size)
        cache_ok = (x.shape[0] + x2.shape[0]) * num_params * 8 <= max_jacobian_bytes
        cache: dict[tuple[int, int, int], Any] = {}
        gram = _gram_fn()

        def get(which: int, a: np.ndarray, lo: int, hi: int):
            key = (which, lo, hi)
            if key in cache:
                return cache[key]
            J = block(a, lo, hi)
            if cache_ok:
                cache[key] = J
            return J

        K = np.empty((x.shape[0], x2.shape[0]), np.float64)
        sym = x2_MxD is None
        for lo, hi in rows:
            J_a = get(0, x, lo, hi)
            for lo2, hi2 in cols:
                if sym and lo2 < lo:
                    continue  # lower blocks are the transposes of upper ones
                J_b = J_a if (sym and lo2 == lo) else get(0 if sym else 1, x2, lo2, hi2)
                K[lo:hi, lo2:hi2] = np.asarray(gram(J_a, J_b))
                if sym:
                    K[lo2:hi2, lo:hi] = K[lo:hi, lo2:hi2].T
    return K


# --- one-hidden-layer ReLU expert in NTK parameterisation: f(φ, x) = (1/√m) Σ_r a_r relu(w_rᵀ x) ---------------


@dataclasses.dataclass(frozen=True)
class ReluExperts:
    """Stacked parameters of E ReLU experts: ``W [E, m, D]``, ``a [E, m]``.

    Hidden units come in pairs with equal w and opposite a, so every expert (and the MoE) is exactly 0 at
    initialisation: the trained network then starts where the kernel predictor does (no offset term).
    """

    W: np.ndarray
    a: np.ndarray

    @property
    def width(self) -> int:
        return int(self.a.shape[1])


def init_relu_experts(rng: np.random.Generator, num_experts: int, width: int, dim: int) -> ReluExperts:
    if width < 2 or width % 2:
        raise TheoryError(f"expert width must be an even number >= 2 (hidden units are paired), got {width}")
    half = width // 2
    W = rng.standard_normal((num_experts, half, dim))
    a = rng.standard_normal((num_experts, half))
    return ReluExperts(W=np.concatenate([W, W], axis=1), a=np.concatenate([a, -a], axis=1))


def relu_expert_apply(params: tuple, x_D):
    """One expert on one input: params = (W [m, D], a [m]) -> scalar."""
    import jax.numpy as jnp

    W, a = params
    return jnp.dot(a, jnp.maximum(W @ x_D, 0.0)) / jnp.sqrt(a.shape[0])


def relu_expert_kernels(experts: ReluExperts, x_NxD: Any, x2_MxD: Any | None = None, *,
                        chunk_size: int = 64) -> np.ndarray:
    """Empirical NTK of every expert, ``K [E, N, M]``, by autodiff (:func:`empirical_ntk`)."""
    return np.stack([empirical_ntk(relu_expert_apply, (experts.W[k], experts.a[k]), x_NxD, x2_MxD,
                                   chunk_size=chunk_size) for k in range(experts.W.shape[0])])


def moe_apply(params: tuple, g_NxE, x_NxD):
    """The MoE ``F(x_i) = Σ_k g_ik f_k(x_i)`` for all samples at once; params = (W [E, m, D], a [E, m]) -> [N]."""
    import jax.numpy as jnp

    W, a = params
    h_ENM = jnp.maximum(jnp.einsum("emd,nd->enm", W, x_NxD), 0.0)
    f_EN = jnp.einsum("em,enm->en", a, h_ENM) / jnp.sqrt(a.shape[1])
    return jnp.einsum("ne,en->n", g_NxE, f_EN)
