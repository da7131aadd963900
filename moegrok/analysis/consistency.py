"""Pathway consistency (METHOD §5): how much a sample's routing embedding keeps its direction from layer to layer.

For sample i at MoE layer l the routing embedding is ``e_il = sum_k g_l(i)_k W_l[k]`` (full router softmax averaged
over the sample's tokens, times the router weight matrix of the same checkpoint). With ``c_l = cos(e_il, e_i,l+1)``:

- raw consistency ``R = mean_l c_l`` (always defined),
- consistency ``S = R / (max_l c_l + 1e-8)`` and complexity ``C = 1 - S``, n/a for a sample whose
  ``max_l c_l <= 0.05`` (the normalisation is ill-conditioned there; METHOD §5).

Everything is computed in one jitted call batched over checkpoints and samples, in float32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moegrok.errors import MoegrokError

MAX_COS_FLOOR = 0.05  # METHOD §5: S and C are n/a when max_l c_l <= this
S_EPS = 1e-8  # METHOD §5: the paper's stabiliser in the denominator of S


@dataclasses.dataclass(frozen=True)
class Consistency:
    """Per checkpoint b and sample n. ``S``/``C`` hold NaN exactly where ``s_defined`` is False; callers must
    report those as n/a (see :meth:`undefined_reason`), never average them silently."""

    S_BxN: np.ndarray
    C_BxN: np.ndarray
    R_BxN: np.ndarray
    max_cos_BxN: np.ndarray
    cos_BxNxLm1: np.ndarray  # adjacent-layer cosines c_1..c_{L-1}
    s_defined_BxN: np.ndarray  # bool: max_l c_l > MAX_COS_FLOOR

    @property
    def num_s_undefined(self) -> int:
        return int((~self.s_defined_BxN).sum())

    def undefined_reason(self) -> str | None:
        n = self.num_s_undefined
        if n == 0:
            return None
        return (f"n/a: S and C undefined for {n} of {self.s_defined_BxN.size} (checkpoint, sample) pairs "
                f"whose max adjacent-layer cosine is <= {MAX_COS_FLOOR}")


def consistency_undefined_reason(num_layers: int) -> str | None:
    """Why consistency cannot be computed for a model with `num_layers` MoE layers, or None if it can."""
    if num_layers < 2:
        return f"n/a: consistency needs at least 2 MoE layers (adjacent-layer cosines), the run has {num_layers}"
    return None


def consistency_caveat(num_layers: int) -> str | None:
    """A warning for the report when S is defined but degenerate."""
    if num_layers == 2:
        return ("with 2 MoE layers S = c_1 / (c_1 + 1e-8) is 1 wherever defined: S and C carry no information, "
                "use R")
    return None


@jax.jit
def _consistency_kernel(g_BxNxLxE, W_BxLxExD):
    hi = jax.lax.Precision.HIGHEST  # GPUs would otherwise use TF32 for the Gram matrices
    # Work with E x E Gram matrices instead of the N x L x d embeddings: for OLMoE (d = 2048) the embeddings of a
    # 4096-sample probe set are ~0.5 GB per checkpoint, the Grams 16 x 64 x 64 floats.
    self_BxLxExE = jnp.einsum("bled,blfd->blef", W_BxLxExD, W_BxLxExD, precision=hi)
    cross_BxLm1xExE = jnp.einsum("bled,blfd->blef", W_BxLxExD[:, :-1], W_BxLxExD[:, 1:], precision=hi)
    g0, g1 = g_BxNxLxE[:, :, :-1], g_BxNxLxE[:, :, 1:]
    dot_BxNxLm1 = jnp.einsum("bnle,blef,bnlf->bnl", g0, cross_BxLm1xExE, g1, precision=hi)
    sq_BxNxL = jnp.einsum("bnle,blef,bnlf->bnl", g_BxNxLxE, self_BxLxExE, g_BxNxLxE, precision=hi)
    norm_BxNxL = jnp.sqrt(jnp.maximum(sq_BxNxL, 0.0))  # rounding can push a PSD form a hair below 0
    denom = norm_BxNxL[:, :, :-1] * norm_BxNxL[:, :, 1:]
    # A zero embedding (all-zero router rows) has no direction: cosine 0 rather than NaN.
    cos = jnp.where(denom > 0, dot_BxNxLm1 / jnp.where(denom > 0, denom, 1.0), 0.0)
    cos = jnp.clip(cos, -1.0, 1.0)
    R = cos.mean(-1)
    mx = cos.max(-1)
    defined = mx > MAX_COS_FLOOR
    S = jnp.where(defined, R / (mx + S_EPS), jnp.nan)
    return S, 1.0 - S, R, mx, cos, defined


def pathway_consistency(route_probs_BxNxLxE: np.ndarray, router_weights_BxLxExD: np.ndarray) -> Consistency:
    """S, C, R for every checkpoint b and sample n.

    route_probs_BxNxLxE: mean full router softmax per sample (a single checkpoint may omit B: [N, L, E]).
    router_weights_BxLxExD: router weight matrix per checkpoint and layer, row k = expert k ([L, E, d] without B).
    """
    g = np.asarray(route_probs_BxNxLxE, dtype=np.float32)
    W = np.asarray(router_weights_BxLxExD, dtype=np.float32)
    single = g.ndim == 3
    if single:
        g, W = g[None], W[None]
    if g.ndim != 4 or W.ndim != 4:
        raise MoegrokError(f"pathway_consistency: route_probs must be [B, N, L, E] and router_weights [B, L, E, d]; "
                           f"got {g.shape} and {W.shape}")
    B, N, L, E = g.shape
    if W.shape[:3] != (B, L, E):
        raise MoegrokError(f"pathway_consistency: router_weights shape {W.shape} does not match route_probs "
                           f"{g.shape} (expected [{B}, {L}, {E}, d])")
    reason = consistency_undefined_reason(L)
    if reason:
        raise MoegrokError(reason)
    if not (np.isfinite(g).all() and np.isfinite(W).all()):
        raise MoegrokError("pathway_consistency: route_probs or router_weights contain NaN/inf")
    out = [np.asarray(a) for a in _consistency_kernel(g, W)]
    if single:
        out = [a[0] for a in out]
    return Consistency(*out[:5], s_defined_BxN=out[5].astype(bool))
