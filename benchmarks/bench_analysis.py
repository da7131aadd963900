"""Analysis hot spots, ours vs a straightforward reference, side by side in one run:

1. pathway consistency S, C, R (`moegrok.analysis.consistency`, one jitted call over checkpoints x samples, E x E
   Gram matrices) vs NumPy float64 that materialises the routing embeddings e_il per checkpoint (METHOD §5 as
   written);
2. t* for every sample (vectorised suffix-and) vs a Python loop over samples and checkpoints;
3. t# for every test item (vectorised suffix sums) vs a Python loop.

    python benchmarks/bench_analysis.py [--checkpoints 10 --samples 1024 --layers 16 --experts 64 --d 2048]

Defaults are OLMoE-1B-7B's router shape (16 MoE layers, 64 experts, d 2048) at 10 checkpoints. Prints seconds
(best of --repeats), the ratio reference/ours, and the max difference as a check that both computed the same thing.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (jit compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ref_consistency(g_BxNxLxE, W_BxLxExD):
    R = np.empty(g_BxNxLxE.shape[:2])
    for b in range(g_BxNxLxE.shape[0]):
        e = np.einsum("nle,led->nld", g_BxNxLxE[b].astype(np.float64), W_BxLxExD[b].astype(np.float64))
        n = np.linalg.norm(e, axis=-1)
        cos = (e[:, :-1] * e[:, 1:]).sum(-1) / (n[:, :-1] * n[:, 1:])
        R[b] = cos.mean(-1)
    return R


def ref_t_star(loss_TxN, eps, delta):
    T, N = loss_TxN.shape
    out = np.full(N, -1)
    for i in range(N):
        for t in range(T - 1):
            if all(loss_TxN[u, i] <= eps and abs(loss_TxN[u, i] - loss_TxN[-1, i]) <= delta for u in range(t, T)):
                out[i] = t
                break
    return out


def ref_t_hash(c_TxM):
    T, M = c_TxM.shape
    out = np.full(M, -1)
    for j in range(M):
        for t in range(T):
            rest = c_TxM[t:, j]
            if rest[0] and rest.mean() > 0.8 and (~rest).sum() <= 1:
                out[j] = t
                break
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--items", type=int, default=20000, help="samples / test items for the t* and t# rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    from moegrok.analysis.consistency import pathway_consistency
    from moegrok.analysis.generalization import generalized_since
    from moegrok.analysis.memorization import memorized_since

    rng = np.random.default_rng(0)
    B, N, L, E, d = args.checkpoints, args.samples, args.layers, args.experts, args.d
    logits = rng.normal(size=(B, N, L, E)).astype(np.float32) * 2
    g = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    W = (rng.normal(size=(B, L, E, d)) + rng.normal(size=(1, 1, E, d))).astype(np.float32) * 0.02
    print(f"backend {jax.default_backend()}; consistency: {B} checkpoints x {N} samples, L={L} E={E} d={d}")
    t_ours = best_time(lambda: pathway_consistency(g, W), args.repeats)
    t_ref = best_time(lambda: ref_consistency(g, W), max(1, args.repeats - 2))
    diff = np.abs(pathway_consistency(g, W).R_BxN - ref_consistency(g, W)).max()
    print(f"{'task':<28}{'ours s':>10}{'reference s':>14}{'ref/ours':>10}  check")
    print(f"{'consistency S,C,R':<28}{t_ours:>10.3f}{t_ref:>14.3f}{t_ref / t_ours:>10.1f}  max|dR| {diff:.1e}")

    T, M = args.checkpoints, args.items
    loss = np.abs(np.cumsum(rng.normal(scale=0.05, size=(T, M)), axis=0)) + rng.random(M)
    t_ours = best_time(lambda: memorized_since(loss, 0.5, 0.05), args.repeats)
    t_ref = best_time(lambda: ref_t_star(loss, 0.5, 0.05), 1)
    same = (memorized_since(loss, 0.5, 0.05) == ref_t_star(loss, 0.5, 0.05)).all()
    print(f"{'t* (memorized since)':<28}{t_ours:>10.4f}{t_ref:>14.3f}{t_ref / t_ours:>10.0f}  equal {same}")
    c = rng.random((T, M)) < np.linspace(0.1, 0.97, T)[:, None]
    t_ours = best_time(lambda: generalized_since(c), args.repeats)
    t_ref = best_time(lambda: ref_t_hash(c), 1)
    same = (generalized_since(c) == ref_t_hash(c)).all()
    print(f"{'t# (generalized since)':<28}{t_ours:>10.4f}{t_ref:>14.3f}{t_ref / t_ours:>10.0f}  equal {same}")


if __name__ == "__main__":
    main()
