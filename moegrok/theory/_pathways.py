"""Pathway strings and their mean pairwise distance, for the theory checks.

Uses ``moegrok.analysis.pathways`` / ``moegrok.analysis.levenshtein`` when they are importable (the project's
implementations of SPEC §4); the small private fallback below exists only so this module works while those are being
written, and follows the same rules: τ-rule expert lists (descending weight, ties to the lower index, keep until the
cumulative weight first reaches τ, the crossing expert kept), text (``3,1-9,1``) or expert-symbol encoding, unit-cost
Levenshtein, normalised by the longer length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moegrok.theory.kernel import TheoryError

ENCODINGS = ("text", "expert")


def tau_expert_lists(probs_NxLxE: np.ndarray, tau: float) -> list[list[list[int]]]:
    p = np.asarray(probs_NxLxE, dtype=np.float64)
    if p.ndim != 3:
        raise TheoryError(f"routing probabilities must be [N, L, E], got shape {p.shape}")
    if not 0.0 < tau <= 1.0:
        raise TheoryError(f"τ must be in (0, 1], got {tau}")
    order = np.argsort(-p, axis=-1, kind="stable")  # stable: equal weights keep the lower index first
    csum = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
    # Number kept = index of the first crossing + 1; if rounding keeps every sum below τ, keep all experts.
    reached = csum >= tau
    keep = np.where(reached.any(-1), reached.argmax(-1) + 1, p.shape[-1])
    return [[order[i, l, : keep[i, l]].tolist() for l in range(p.shape[1])] for i in range(p.shape[0])]


def encode(lists: Sequence[Sequence[Sequence[int]]], encoding: str, num_experts: int) -> list:
    if encoding == "text":
        return ["-".join(",".join(str(e) for e in layer) for layer in sample) for sample in lists]
    if encoding == "expert":
        sep = num_experts  # one symbol that no expert id uses
        out = []
        for sample in lists:
            seq: list[int] = []
            for l, layer in enumerate(sample):
                if l:
                    seq.append(sep)
                seq.extend(layer)
            out.append(seq)
        return out
    raise TheoryError(f"pathway encoding must be one of {ENCODINGS}, got {encoding!r}")


def _as_int_seq(s) -> np.ndarray:
    return np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.int64) if isinstance(s, str) \
        else np.asarray(s, dtype=np.int64)


def _levenshtein_pairs(a_seqs: list[np.ndarray], b_seqs: list[np.ndarray]) -> np.ndarray:
    """Unit-cost edit distance of a_seqs[p] vs b_seqs[p] for every p, one DP row at a time vectorised over pairs."""
    P = len(a_seqs)
    la = np.array([len(s) for s in a_seqs])
    lb = np.array([len(s) for s in b_seqs])
    A = np.full((P, max(la.max(initial=0), 1)), -1, np.int64)
    B = np.full((P, max(lb.max(initial=0), 1)), -2, np.int64)
    for p in range(P):
        A[p, : la[p]] = a_seqs[p]
        B[p, : lb[p]] = b_seqs[p]
    Lb = B.shape[1]
    row = np.tile(np.arange(Lb + 1), (P, 1))
    out = np.where(la == 0, lb, 0)
    for i in range(1, A.shape[1] + 1):
        new = np.empty_like(row)
        new[:, 0] = i
        sub = row[:, :-1] + (A[:, i - 1: i] != B)
        dele = row[:, 1:] + 1
        for j in range(1, Lb + 1):  # insertion depends on the cell to the left
            new[:, j] = np.minimum(np.minimum(sub[:, j - 1], dele[:, j - 1]), new[:, j - 1] + 1)
        row = new
        done = la == i
        out[done] = row[done, lb[done]]
    return out


def _fallback_matrix(seqs: list) -> np.ndarray:
    arrs = [_as_int_seq(s) for s in seqs]
    n = len(arrs)
    iu, ju = np.triu_indices(n, k=1)
    D = np.zeros((n, n), np.int32)
    if len(iu):
        d = _levenshtein_pairs([arrs[i] for i in iu], [arrs[j] for j in ju])
        D[iu, ju] = d
        D[ju, iu] = d
    return D


def levenshtein_matrix(seqs: list) -> np.ndarray:
    """All-pairs edit distance ``[N, N]`` int32 (project implementation when available)."""
    try:
        from moegrok.analysis.levenshtein import levenshtein_matrix as project_matrix
    except ImportError:
        return _fallback_matrix(seqs)
    return np.asarray(project_matrix(seqs), dtype=np.int32)


def mean_pair_distance(seqs: list, normalised: bool = True) -> float:
    """Mean (normalised) edit distance over all unordered pairs of distinct samples; needs >= 2 samples."""
    n = len(seqs)
    if n < 2:
        raise TheoryError(f"pathway distance needs at least 2 samples, got {n}")
    D = levenshtein_matrix(seqs).astype(np.float64)
    iu, ju = np.triu_indices(n, k=1)
    d = D[iu, ju]
    if normalised:
        lens = np.array([len(s) for s in seqs], np.float64)
        longer = np.maximum(lens[iu], lens[ju])
        d = np.where(longer > 0, d / np.maximum(longer, 1.0), 0.0)  # two empty pathways are identical
    return float(d.mean())


def pathway_distance(probs_NxLxE: np.ndarray, tau: float = 0.7, encoding: str = "text",
                     normalised: bool = True) -> float:
    """Mean pairwise pathway distance of the samples in `probs_NxLxE` (SPEC §4)."""
    lists = tau_expert_lists(probs_NxLxE, tau)
    return mean_pair_distance(encode(lists, encoding, np.asarray(probs_NxLxE).shape[-1]), normalised)


def mean_kept(probs_NxLxE: np.ndarray, tau: float = 0.7) -> float:
    """Saturation diagnostic: mean number of experts the τ rule keeps per (sample, layer)."""
    lists = tau_expert_lists(probs_NxLxE, tau)
    return float(np.mean([len(layer) for sample in lists for layer in sample]))
