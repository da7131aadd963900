"""Expert pathways of probe samples and their pairwise distances (METHOD §4), from the arrays of a probe record.

Sample level (paper): for sample i and MoE layer l, ``route_probs[i, l]`` is the router's full softmax averaged over
the sample's real tokens. The τ rule sorts experts by that weight (descending, ties: lower index first) and keeps
them until the cumulative weight first reaches τ, the crossing expert included. The pathway is the kept lists of
all layers in layer order, encoded as

- ``"text"`` (paper-faithful default): experts joined by ``,``, layers by ``-`` (``3,1,5-9,1-...``); distance is
  character-level Levenshtein on the string;
- ``"expert"``: integer symbols, expert ids with one separator symbol (``E``, the number of experts) between
  layers; distance is symbol-level Levenshtein.

Distances between two samples are raw and normalised by the longer pathway length (two empty pathways: 0). A group's
value is the mean over unordered pairs of distinct samples: every pair up to ``max_all_pairs`` samples (4096), above
that a fixed-seed sample of pairs that depends only on (group size, seed), so a group whose rows come in the same
order gets the same pairs at every checkpoint (METHOD §4 Decision).

Token level (beyond the paper): a token's pathway is its top-k expert ids per layer in weight order (as stored in
``topk_ids``), layers in order. A sample pair's distance is the mean Levenshtein over aligned token positions:
``align="position"`` pairs equal positions where both samples have a real token (templated data);
``align="prefix"`` pairs the t-th real token of each sample, t < min(len_i, len_j) (free text).

Saturation diagnostics always accompany a distance: mean experts kept per layer, mean top-expert weight, routing
entropy per layer, and ``saturated``: mean kept per (sample, layer) >= ``saturated_fraction`` (0.5) x E. A
saturated distance compares pathways that hold most experts and sits near its ceiling whatever the routing does.

All functions are pure (NumPy in, NumPy/dataclasses out); edit distances come from
:mod:`moegrok.analysis.levenshtein`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moegrok.analysis.levenshtein import levenshtein_matrix, levenshtein_pairs
from moegrok.errors import MoegrokError

ENCODINGS = ("text", "expert")
ALIGNMENTS = ("position", "prefix")
DEFAULT_TAU = 0.7
MAX_ALL_PAIRS = 4096  # METHOD §4 Decision: all pairs up to this many samples
SATURATED_FRACTION = 0.5
_SUM_TOL = 0.02  # rows of a softmax average must sum to 1 within this (bf16-stored records included)


class PathwayError(MoegrokError, ValueError):
    """Bad input to a pathway function; the message names the argument and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _route_probs(route_probs: Any) -> np.ndarray:
    p = np.asarray(route_probs)
    if p.ndim != 3:
        raise PathwayError(f"route_probs: expected shape [N, L, E] (samples, MoE layers, experts), got {p.shape}")
    if p.dtype.kind != "f":
        raise PathwayError(f"route_probs: expected floating-point router probabilities, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.size:
        if not np.isfinite(p).all():
            raise PathwayError("route_probs: contains NaN or inf")
        if p.min() < 0:
            raise PathwayError(f"route_probs: negative probability {p.min():.3g} (expected a softmax average)")
        s = p.sum(-1)
        bad = np.abs(s - 1.0) > _SUM_TOL
        if bad.any():
            n, l = np.argwhere(bad)[0]
            raise PathwayError(f"route_probs: row [sample {n}, layer {l}] sums to {s[n, l]:.4f}; expected the full "
                               f"router softmax over all E experts (sums to 1), not logits or top-k weights")
    return p


def _tau(tau: float) -> float:
    if not (isinstance(tau, (int, float, np.floating)) and 0.0 < float(tau) <= 1.0):
        raise PathwayError(f"tau: must be a number in (0, 1], got {tau!r}")
    return float(tau)


def _encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise PathwayError(f"encoding: must be one of {ENCODINGS}, got {encoding!r}")
    return encoding


# ----------------------------------------------------------------------------------------------------------------
# τ rule and encodings


def tau_rule(route_probs_NxLxE: Any, tau: float = DEFAULT_TAU) -> tuple[np.ndarray, np.ndarray]:
    """Experts kept by the τ rule: ``(order_NxLxE int32, n_kept_NxL int32)``.

    ``order[i, l]`` lists all experts by weight, descending, ties to the lower index; the first ``n_kept[i, l]``
    are kept: the shortest prefix whose cumulative weight reaches τ (the crossing expert included). Sums are taken
    in float64; if rounding leaves every prefix below τ (τ = 1), all experts are kept.
    """
    p = _route_probs(route_probs_NxLxE)
    tau = _tau(tau)
    order = np.argsort(-p, axis=-1, kind="stable")  # stable on -p: equal weights keep the lower index first
    csum = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
    reached = csum >= tau
    n_kept = np.where(reached.any(-1), reached.argmax(-1) + 1, p.shape[-1])
    return order.astype(np.int32), n_kept.astype(np.int32)


def expert_lists(route_probs_NxLxE: Any, tau: float = DEFAULT_TAU) -> list[list[list[int]]]:
    """Kept expert ids per sample, per layer, in weight order (the τ rule of :func:`tau_rule`)."""
    order, n_kept = tau_rule(route_probs_NxLxE, tau)
    return [[order[i, l, : n_kept[i, l]].tolist() for l in range(order.shape[1])] for i in range(order.shape[0])]


def _text(lists: Sequence[Sequence[Sequence[int]]]) -> list[str]:
    return ["-".join(",".join(map(str, layer)) for layer in sample) for sample in lists]


def _expert(lists: Sequence[Sequence[Sequence[int]]], separator: int) -> list[np.ndarray]:
    out = []
    for sample in lists:
        seq: list[int] = []
        for l, layer in enumerate(sample):
            if l:
                seq.append(separator)
            seq.extend(layer)
        out.append(np.asarray(seq, np.int64))
    return out


def encode_pathways(route_probs_NxLxE: Any, tau: float = DEFAULT_TAU, encoding: str = "text") -> list:
    """Sample-level pathways: a list of N str (``"text"``) or N int64 arrays (``"expert"``, separator = E)."""
    encoding = _encoding(encoding)
    lists = expert_lists(route_probs_NxLxE, tau)
    if encoding == "text":
        return _text(lists)
    return _expert(lists, separator=np.shape(route_probs_NxLxE)[-1])


def layer_pathways(route_probs_NxLxE: Any, tau: float = DEFAULT_TAU, encoding: str = "text") -> list[list]:
    """Per layer l, the one-layer pathways of all samples: ``out[l][i]`` (str for text, int64 array for expert)."""
    encoding = _encoding(encoding)
    lists = expert_lists(route_probs_NxLxE, tau)
    L = np.shape(route_probs_NxLxE)[1]
    if encoding == "text":
        return [[",".join(map(str, s[l])) for s in lists] for l in range(L)]
    return [[np.asarray(s[l], np.int64) for s in lists] for l in range(L)]


# ----------------------------------------------------------------------------------------------------------------
# Pairs


def num_all_pairs(n: int) -> int:
    return n * (n - 1) // 2


def pair_indices(n: int, *, max_all_pairs: int = MAX_ALL_PAIRS, num_sampled_pairs: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Unordered pairs of distinct samples of a group of n: ``(i_P, j_P, sampled)`` with i < j.

    All pairs when ``n <= max_all_pairs``; else ``num_sampled_pairs`` distinct pairs drawn uniformly without
    replacement (default: as many as all pairs of ``max_all_pairs`` samples, so precision does not drop at the
    threshold), from a generator seeded by ``(seed, n)``: the same pairs at every checkpoint for the same group.
    """
    if n < 0:
        raise PathwayError(f"n must be >= 0, got {n}")
    if n <= max_all_pairs:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64), False
    total = num_all_pairs(n)
    k = num_all_pairs(max_all_pairs) if num_sampled_pairs is None else int(num_sampled_pairs)
    if k < 1:
        raise PathwayError(f"num_sampled_pairs must be >= 1, got {k}")
    k = min(k, total)
    rng = np.random.default_rng([seed, n])
    flat = np.sort(rng.choice(total, size=k, replace=False))
    i, j = _triu_decode(flat, n)
    return i, j, True


def _triu_decode(flat: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major index into the strict upper triangle of an n x n matrix -> (i, j)."""
    flat = flat.astype(np.int64)
    start = lambda i: i * (2 * n - i - 1) // 2  # index of (i, i+1)
    i = np.floor(((2 * n - 1) - np.sqrt((2.0 * n - 1) ** 2 - 8.0 * flat)) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    for _ in range(2):  # float rounding: at most one row off either way
        i = np.where(start(i) > flat, i - 1, i)
        i = np.where(start(i + 1) <= flat, i + 1, i)
    return i, flat - start(i) + i + 1


def cross_pair_indices(n_a: int, n_b: int, *, max_all_pairs: int = MAX_ALL_PAIRS,
                       num_sampled_pairs: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pairs (a-sample, b-sample) between two disjoint groups: all ``n_a * n_b`` while that is at most the
    all-pairs budget of ``max_all_pairs`` samples, else a fixed-seed sample (seeded by ``(seed, n_a, n_b)``)."""
    total = n_a * n_b
    budget = num_all_pairs(max_all_pairs)
    if total <= budget:
        i, j = np.divmod(np.arange(total, dtype=np.int64), n_b) if n_b else (np.zeros(0, np.int64),) * 2
        return i, j, False
    k = min(budget if num_sampled_pairs is None else int(num_sampled_pairs), total)
    if k < 1:
        raise PathwayError(f"num_sampled_pairs must be >= 1, got {k}")
    rng = np.random.default_rng([seed, n_a, n_b])
    flat = np.sort(rng.choice(total, size=k, replace=False))
    i, j = np.divmod(flat, n_b)
    return i, j, True


# ----------------------------------------------------------------------------------------------------------------
# Distances


@dataclasses.dataclass(frozen=True)
class PairDistance:
    """Mean pathway distance over pairs: raw (edit operations) and normalised by the longer length."""

    mean: float
    mean_normalised: float
    num_pairs: int
    sampled: bool  # True: a fixed-seed subsample of the pairs (group above max_all_pairs)


def _lengths(seqs: Sequence) -> np.ndarray:
    return np.array([len(s) for s in seqs], np.int64)


def _normalise(d: np.ndarray, la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    longer = np.maximum(la, lb).astype(np.float64)
    return np.where(longer > 0, d / np.maximum(longer, 1.0), 0.0)  # two empty pathways are identical


def pair_distances(seqs: Sequence, *, max_all_pairs: int = MAX_ALL_PAIRS, num_sampled_pairs: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Distances of the pairs of :func:`pair_indices`: ``(i_P, j_P, raw_P int32, normalised_P float64, sampled)``.

    `seqs`: N pathways (str or integer sequences)."""
    n = len(seqs)
    i, j, sampled = pair_indices(n, max_all_pairs=max_all_pairs, num_sampled_pairs=num_sampled_pairs, seed=seed)
    if i.size == 0:
        return i, j, np.zeros(0, np.int32), np.zeros(0), sampled
    if sampled:
        d = levenshtein_pairs(seqs, i, j)
    else:
        d = levenshtein_matrix(seqs)[i, j]
    lens = _lengths(seqs)
    return i, j, d, _normalise(d, lens[i], lens[j]), sampled


def _need_pairs(n: int, what: str) -> None:
    if n < 2:
        raise PathwayError(f"{what}: a mean over pairs of distinct samples needs at least 2 samples, got {n} "
                           f"(skip groups smaller than 2)")


def mean_pair_distance(seqs: Sequence, *, max_all_pairs: int = MAX_ALL_PAIRS, num_sampled_pairs: int | None = None,
                       seed: int = 0) -> PairDistance:
    """Mean distance over unordered pairs of distinct pathways in `seqs` (at least 2)."""
    _need_pairs(len(seqs), "mean_pair_distance")
    _, _, d, dn, sampled = pair_distances(seqs, max_all_pairs=max_all_pairs, num_sampled_pairs=num_sampled_pairs,
                                          seed=seed)
    return PairDistance(float(d.mean()), float(dn.mean()), int(d.size), sampled)


def mean_cross_distance(seqs_a: Sequence, seqs_b: Sequence, *, max_all_pairs: int = MAX_ALL_PAIRS,
                        num_sampled_pairs: int | None = None, seed: int = 0) -> PairDistance:
    """Mean distance over pairs (one pathway of `seqs_a`, one of `seqs_b`): the cross-group control."""
    if len(seqs_a) == 0 or len(seqs_b) == 0:
        raise PathwayError(f"mean_cross_distance: both groups need samples, got {len(seqs_a)} and {len(seqs_b)}")
    i, j, sampled = cross_pair_indices(len(seqs_a), len(seqs_b), max_all_pairs=max_all_pairs,
                                       num_sampled_pairs=num_sampled_pairs, seed=seed)
    if sampled:
        d = levenshtein_pairs(seqs_a, i, j, b=seqs_b)
    else:
        d = levenshtein_matrix(seqs_a, seqs_b)[i, j]
    dn = _normalise(d, _lengths(seqs_a)[i], _lengths(seqs_b)[j])
    return PairDistance(float(d.mean()), float(dn.mean()), int(d.size), sampled)


def pathway_distance(route_probs_NxLxE: Any, *, tau: float = DEFAULT_TAU, encoding: str = "text",
                     max_all_pairs: int = MAX_ALL_PAIRS, num_sampled_pairs: int | None = None,
                     seed: int = 0) -> PairDistance:
    """METHOD §4 group pathway distance: mean over pairs of distinct samples of ``Levenshtein(s_i, s_j)``.

    Pass the group's rows of ``route_probs`` in the same order at every checkpoint (e.g. sorted by sample id) so
    that a sampled pair set (groups above `max_all_pairs`) stays the same."""
    seqs = encode_pathways(route_probs_NxLxE, tau, encoding)
    _need_pairs(len(seqs), "pathway_distance")
    return mean_pair_distance(seqs, max_all_pairs=max_all_pairs, num_sampled_pairs=num_sampled_pairs, seed=seed)


@dataclasses.dataclass(frozen=True)
class LayerwiseDistance:
    """Mean one-layer pathway distance per MoE layer, over the same pairs for every layer."""

    mean_L: np.ndarray
    mean_normalised_L: np.ndarray
    num_pairs: int
    sampled: bool


def layerwise_distance(route_probs_NxLxE: Any, *, tau: float = DEFAULT_TAU, encoding: str = "text",
                       max_all_pairs: int = MAX_ALL_PAIRS, num_sampled_pairs: int | None = None,
                       seed: int = 0) -> LayerwiseDistance:
    """METHOD §4 layer-wise variant: the distance of each layer's expert list alone, averaged over pairs."""
    per_layer = layer_pathways(route_probs_NxLxE, tau, encoding)
    n = np.shape(route_probs_NxLxE)[0]
    _need_pairs(n, "layerwise_distance")
    raw, norm, npairs, sampled = [], [], 0, False
    for seqs in per_layer:
        _, _, d, dn, sampled = pair_distances(seqs, max_all_pairs=max_all_pairs,
                                              num_sampled_pairs=num_sampled_pairs, seed=seed)
        raw.append(d.mean())
        norm.append(dn.mean())
        npairs = d.size
    return LayerwiseDistance(np.asarray(raw, np.float64), np.asarray(norm, np.float64), int(npairs), sampled)


# ----------------------------------------------------------------------------------------------------------------
# Token-level pathways


def _topk(topk_ids: Any, num_experts: int) -> np.ndarray:
    ids = np.asarray(topk_ids)
    if ids.ndim != 4:
        raise PathwayError(f"topk_ids: expected shape [N, T, L, k] (samples, tokens, MoE layers, top-k), "
                           f"got {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise PathwayError(f"topk_ids: expected integer expert ids, got dtype {ids.dtype}")
    if not (isinstance(num_experts, (int, np.integer)) and num_experts >= 1):
        raise PathwayError(f"num_experts: must be a positive int, got {num_experts!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise PathwayError(f"topk_ids: ids must lie in [0, {num_experts}) (num_experts), "
                           f"got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)


def _mask(token_mask: Any, shape_NxT: tuple[int, int]) -> np.ndarray:
    m = np.asarray(token_mask)
    if m.shape != shape_NxT:
        raise PathwayError(f"token_mask: shape {m.shape}, expected {shape_NxT} to match topk_ids [N, T, ...]")
    if m.dtype.kind != "b":
        raise PathwayError(f"token_mask: expected bool (True on real tokens), got dtype {m.dtype}")
    return m


def _token_seqs(ids_MxLxk: np.ndarray, num_experts: int, encoding: str) -> list:
    """Pathways of M tokens: str (text) or int64 arrays (expert ids, separator = num_experts between layers)."""
    if encoding == "text":
        return ["-".join(",".join(map(str, layer)) for layer in tok) for tok in ids_MxLxk.tolist()]
    M, L, k = ids_MxLxk.shape
    seq = np.full((M, L, k + 1), num_experts, np.int64)
    seq[:, :, :k] = ids_MxLxk
    return list(seq.reshape(M, L * (k + 1))[:, :-1])  # drop the trailing separator


def token_pathways(topk_ids_NxTxLxk: Any, num_experts: int, encoding: str = "expert") -> list[list]:
    """Each token's own pathway, ``out[i][t]``: its top-k ids per layer in stored (weight) order, layers in order.

    Encodings as for samples; the default here is ``"expert"``: with a fixed k per layer the text form only adds
    digit-count noise (expert 12 vs 3). Padding tokens are included; select them with ``token_mask``."""
    encoding = _encoding(encoding)
    ids = _topk(topk_ids_NxTxLxk, num_experts)
    N, T = ids.shape[:2]
    flat = _token_seqs(ids.reshape(N * T, *ids.shape[2:]), num_experts, encoding)
    return [flat[i * T: (i + 1) * T] for i in range(N)]


def position_pathways(topk_ids_NxTxLxk: Any, token_mask_NxT: Any, position: Any, num_experts: int,
                      encoding: str = "expert") -> list:
    """The pathway of one chosen token position per sample (an int for all samples, or an int array [N]), e.g.
    the token that predicts the answer. The position must be a real token of every sample."""
    encoding = _encoding(encoding)
    ids = _topk(topk_ids_NxTxLxk, num_experts)
    N, T = ids.shape[:2]
    mask = _mask(token_mask_NxT, (N, T))
    pos = np.broadcast_to(np.asarray(position), (N,))
    if pos.dtype.kind not in "iu":
        raise PathwayError(f"position: expected an int or int array [N], got dtype {pos.dtype}")
    if N and (pos.min() < 0 or pos.max() >= T):
        raise PathwayError(f"position: must lie in [0, {T}) (T token positions), got range [{pos.min()}, {pos.max()}]")
    rows = np.arange(N)
    bad = ~mask[rows, pos]
    if bad.any():
        raise PathwayError(f"position: token {int(pos[bad][0])} of sample row {int(rows[bad][0])} is padding "
                           f"(token_mask False); {int(bad.sum())} of {N} samples affected")
    return _token_seqs(ids[rows, pos], num_experts, encoding)


def _aligned(ids: np.ndarray, mask: np.ndarray, align: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask with positions aligned: unchanged (position) or real tokens moved to the front (prefix)."""
    if align == "position":
        return ids, mask
    if align != "prefix":
        raise PathwayError(f"align: must be one of {ALIGNMENTS}, got {align!r}")
    order = np.argsort(~mask, axis=1, kind="stable")  # real tokens first, in their order
    ids = np.take_along_axis(ids, order[:, :, None, None], axis=1)
    return ids, np.take_along_axis(mask, order, axis=1)


def token_pathway_distance(topk_ids_NxTxLxk: Any, token_mask_NxT: Any, num_experts: int, *,
                           align: str = "position", encoding: str = "expert", max_all_pairs: int = MAX_ALL_PAIRS,
                           num_sampled_pairs: int | None = None, seed: int = 0) -> PairDistance:
    """Mean over sample pairs of the mean token-pathway distance over their aligned positions.

    Per pair (i, j): average ``Levenshtein(path(i, t), path(j, t))`` over the positions t where both have a real
    token (after ``align``); normalised: each term divided by the longer of the two token pathways first. Pairs
    without a common real position are left out (``num_pairs`` counts the pairs used). Identical token pathways
    at a position are computed once, so templated data is cheap."""
    encoding = _encoding(encoding)
    ids = _topk(topk_ids_NxTxLxk, num_experts)
    N, T = ids.shape[:2]
    mask = _mask(token_mask_NxT, (N, T))
    _need_pairs(N, "token_pathway_distance")
    ids, mask = _aligned(ids, mask, align)
    i, j, sampled = pair_indices(N, max_all_pairs=max_all_pairs, num_sampled_pairs=num_sampled_pairs, seed=seed)
    total = np.zeros(i.size)
    total_n = np.zeros(i.size)
    count = np.zeros(i.size, np.int64)
    for t in range(T):
        rows = np.flatnonzero(mask[:, t])
        if rows.size == 0:
            continue
        both = mask[i, t] & mask[j, t]
        if not both.any():
            continue
        uniq, inv = np.unique(ids[rows, t].reshape(rows.size, -1), axis=0, return_inverse=True)
        seqs = _token_seqs(uniq.reshape(-1, *ids.shape[2:]), num_experts, encoding)
        D = levenshtein_matrix(seqs) if len(seqs) > 1 else np.zeros((1, 1), np.int32)
        lens = _lengths(seqs)
        slot = np.full(N, -1, np.int64)
        slot[rows] = inv.reshape(-1)
        ui, uj = slot[i[both]], slot[j[both]]
        d = D[ui, uj]
        total[both] += d
        total_n[both] += _normalise(d, lens[ui], lens[uj])
        count[both] += 1
    used = count > 0
    if not used.any():
        raise PathwayError("token_pathway_distance: no pair of samples shares a real token position "
                           "(check token_mask and align)")
    per_pair = total[used] / count[used]
    per_pair_n = total_n[used] / count[used]
    return PairDistance(float(per_pair.mean()), float(per_pair_n.mean()), int(used.sum()), sampled)


# ----------------------------------------------------------------------------------------------------------------
# Saturation diagnostics


@dataclasses.dataclass(frozen=True)
class Saturation:
    """Routing sharpness next to a pathway distance (METHOD §4).

    kept_L: mean experts kept by the τ rule per layer; top1_weight_L: mean weight of the top expert per layer;
    entropy_L: mean entropy (nats) of the sample-averaged routing distribution per layer (max: log E);
    saturated: ``mean_kept >= saturated_fraction * num_experts``."""

    kept_L: np.ndarray
    top1_weight_L: np.ndarray
    entropy_L: np.ndarray
    mean_kept: float
    num_experts: int
    saturated_fraction: float
    saturated: bool

    @property
    def rule(self) -> str:
        return (f"saturated when the tau rule keeps on average >= {self.saturated_fraction:g} x E = "
                f"{self.saturated_fraction * self.num_experts:g} experts per (sample, layer); mean kept here "
                f"{self.mean_kept:.2f}")


def saturation(route_probs_NxLxE: Any, *, tau: float = DEFAULT_TAU,
               saturated_fraction: float = SATURATED_FRACTION) -> Saturation:
    """Saturation diagnostics of a group's sample-level routing (needs at least one sample)."""
    p = _route_probs(route_probs_NxLxE)
    if p.shape[0] == 0:
        raise PathwayError("saturation: route_probs has no samples (N = 0)")
    if not 0.0 < saturated_fraction <= 1.0:
        raise PathwayError(f"saturated_fraction: must be in (0, 1], got {saturated_fraction}")
    _, n_kept = tau_rule(p, tau)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    mean_kept = float(n_kept.mean())
    E = p.shape[-1]
    return Saturation(kept_L=n_kept.mean(0), top1_weight_L=p.max(-1).mean(0), entropy_L=-plogp.sum(-1).mean(0),
                      mean_kept=mean_kept, num_experts=E, saturated_fraction=float(saturated_fraction),
                      saturated=bool(mean_kept >= saturated_fraction * E))
