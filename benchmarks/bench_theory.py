"""moegrok.theory speed: ours vs a plain reference, side by side, in one run.

    python benchmarks/bench_theory.py

- empirical NTK of 16 ReLU experts (width 256, d = 100, n = 200): chunked vmap-of-grad Jacobian blocks + XLA Gram
  vs the full ``jax.jacrev`` Jacobian per expert and a NumPy Gram;
- routing kernel H = Σ_k (g_k g_kᵀ) ∘ K_k: jitted scan vs ``np.einsum``;
- d_eff at 10 values of λ: one eigendecomposition (Spectrum reused) vs a linear solve per λ.
Results are checked equal before timing. NumPy/SciPy BLAS runs single-threaded in both columns (see theory/_blas).
"""
from __future__ import annotations

import time

import numpy as np


def _best(fn, repeat: int = 3) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import jax
    import jax.numpy as jnp

    from moegrok.theory._blas import single_threaded_blas
    from moegrok.theory.kernel import effective_dimension, kernel_spectrum, routing_kernel
    from moegrok.theory.ntk import init_relu_experts, relu_expert_apply, relu_expert_kernels

    rng = np.random.default_rng(0)
    E, m, d, n = 16, 256, 100, 200
    ex = init_relu_experts(rng, E, m, d)
    X = rng.standard_normal((n, d)) / np.sqrt(d)
    g = rng.dirichlet(np.ones(E), size=n)

    def ref_ntk():
        with jax.enable_x64(True):
            out = []
            for k in range(E):
                jac = jax.jacrev(lambda p: jax.vmap(lambda x: relu_expert_apply(p, x))(jnp.asarray(X)))(
                    (jnp.asarray(ex.W[k]), jnp.asarray(ex.a[k])))
                J = np.concatenate([np.asarray(j).reshape(n, -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
                out.append(J @ J.T)
            return np.stack(out)

    rows = []
    with single_threaded_blas():
        K = relu_expert_kernels(ex, X)
        np.testing.assert_allclose(K, ref_ntk(), rtol=1e-10, atol=1e-12)
        rows.append(("empirical NTK, 16 experts, n=200, m=256", _best(lambda: relu_expert_kernels(ex, X)),
                     _best(ref_ntk)))

        H = routing_kernel(g, K)
        ref_h = lambda: np.einsum("ik,jk,kij->ij", g, g, K)  # noqa: E731
        np.testing.assert_allclose(H, ref_h(), rtol=1e-12)
        rows.append(("routing kernel H, n=200, E=16", _best(lambda: routing_kernel(g, K), 10), _best(ref_h, 10)))

        lams = np.logspace(-3, 1, 10)

        def ours():
            s = kernel_spectrum(H)
            return [effective_dimension(s, lam) for lam in lams]

        def ref():
            return [float(np.trace(np.linalg.solve(H + lam * np.eye(n), H))) for lam in lams]

        np.testing.assert_allclose(ours(), ref(), rtol=1e-9)
        rows.append(("d_eff at 10 λ, n=200", _best(ours, 10), _best(ref, 10)))

    print(f"{'benchmark':45s} {'ours (s)':>10s} {'reference (s)':>14s} {'ref/ours':>9s}")
    for name, a, b in rows:
        print(f"{name:45s} {a:10.4f} {b:14.4f} {b / a:9.2f}")


if __name__ == "__main__":
    main()
