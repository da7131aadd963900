"""All-pairs exact Levenshtein: moegrok.analysis.levenshtein (JAX) vs rapidfuzz.process.cdist, side by side.

Two workloads (GitHub issue 4):
  1. 2,000 random sequences of length 128 over 64 symbols;
  2. 1,000 text pathways of OLMoE shape: 16 layers x 64 experts, tau = 0.7 rule on a peaked-ish synthetic routing
     distribution (a shared per-layer expert preference + per-sample noise + per-sample sharpness), 500-900 chars.

Ours computes the full symmetric matrix from b=None (each unordered pair once). rapidfuzz gets two DISTINCT list
objects (with the same object it would also compute each pair once; that figure is printed for reference).
Both use every core (rapidfuzz workers=-1; ours: XLA's threads over one tile per core). Each timing is the best of
--repeats interleaved runs after one warm-up call (ours compiles there; the cold time, compilation included, is
printed too). Results are checked equal.

    python benchmarks/bench_levenshtein.py [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from moegrok.analysis.levenshtein import levenshtein_matrix
from moegrok.analysis.pathways import encode_pathways


def olmoe_like_route_probs(n: int, seed: int = 0, layers: int = 16, experts: int = 64) -> np.ndarray:
    """Sample-level routing [n, layers, experts]: softmax((layer preference + sample noise) * sample sharpness)."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(0, 0.8, (1, layers, experts)) + rng.normal(0, 0.8, (n, layers, experts)))
    logits *= rng.uniform(0.95, 1.35, (n, 1, 1))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def compare(name: str, seqs: list, repeats: int) -> dict:
    q = list(seqs)
    c = list(seqs)  # a distinct list object: rapidfuzz then computes every (q, c) pair
    assert q is not c
    t0 = time.perf_counter()
    ours = levenshtein_matrix(seqs)
    cold = time.perf_counter() - t0
    t_ours = t_rf = float("inf")
    for _ in range(repeats):  # interleaved, best of: both sides see the same machine load
        t = time.perf_counter()
        ours = levenshtein_matrix(seqs)
        t_ours = min(t_ours, time.perf_counter() - t)
        t = time.perf_counter()
        ref = cdist(q, c, scorer=Levenshtein.distance, workers=-1, dtype=np.int32)
        t_rf = min(t_rf, time.perf_counter() - t)
    t = time.perf_counter()
    cdist(q, q, scorer=Levenshtein.distance, workers=-1, dtype=np.int32)
    t_rf_same = time.perf_counter() - t
    exact = bool(np.array_equal(ours, ref))
    lens = np.array([len(s) for s in seqs])
    print(f"{name}: N={len(seqs)}, lengths {lens.min()}-{lens.max()} (mean {lens.mean():.0f}), "
          f"load avg {os.getloadavg()[0]:.2f}")
    print(f"  ours (JAX, warm)              {t_ours:8.3f} s   (cold, incl. compile: {cold:.3f} s)")
    print(f"  rapidfuzz cdist(q, c)         {t_rf:8.3f} s   ratio rapidfuzz/ours = {t_rf / t_ours:.2f}")
    print(f"  rapidfuzz cdist(q, q) [ref]   {t_rf_same:8.3f} s   ratio = {t_rf_same / t_ours:.2f}")
    print(f"  identical matrices: {exact}")
    if not exact:
        raise SystemExit(f"{name}: results differ from rapidfuzz")
    return dict(ours=t_ours, cold=cold, rf=t_rf, rf_same=t_rf_same)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a quarter of the sizes (smoke test)")
    args = ap.parse_args()
    import jax
    print(f"JAX {jax.__version__} backend={jax.default_backend()}, cores={len(os.sched_getaffinity(0))}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    scale = 4 if args.quick else 1
    rng = np.random.default_rng(0)
    rand = [rng.integers(0, 64, 128).tolist() for _ in range(2000 // scale)]
    compare("random ints, length 128, 64 symbols", rand, args.repeats)
    paths = encode_pathways(olmoe_like_route_probs(1000 // scale), 0.7, "text")
    compare("OLMoE-shape text pathways (16 x 64, tau 0.7)", paths, args.repeats)


if __name__ == "__main__":
    main()
