"""The routing kernel of a real run, per checkpoint, from its probe record alone (METHOD §7 (d)).

Routing weights: ``g_i = route_probs[i, ℓ]``, the full router softmax of sample i averaged over its real tokens, at
one MoE layer ℓ (default: the last). The record keeps no expert parameters or hidden states, so the experts' true NTK
cannot be evaluated; two expert kernels that the record does determine are used instead, both exact NTKs of a simple
expert family:

- ``constant``: ``K_k ≡ 1`` — expert k outputs a learnable constant (its NTK w.r.t. that constant is 1). Then
  ``H = G Gᵀ``, the Gram matrix of routing vectors: it measures only how much samples share experts, which is the
  quantity the theory says drives d_eff. d_eff is computed from the [E, E] matrix ``GᵀG`` (same non-zero spectrum).
- ``embedding``: linear experts on the routing embedding ``e_i = Σ_k g_ik W_ℓ[k]`` (METHOD §5, router weights of the
  same checkpoint): ``K_k(x_i, x_j) = ⟨e_i, e_j⟩`` for all k, so ``H = (G Gᵀ) ∘ (Z Zᵀ)`` with ``Z = G W_ℓ``. Adds the
  router's geometry (which experts have similar router vectors).

Ridge λ: by default relative, ``λ = lam_rel · Tr(H)/n``. Routing sharpens during training (Tr(G Gᵀ) = Σ‖g_i‖² grows
from n/E towards n) and weight decay changes router-weight norms (docs/findings.md): with a fixed λ, d_eff would mostly track
that scale. A relative λ makes d_eff a measure of spectral shape; an absolute λ can be asked for.

Everything is read through :class:`moegrok.rundir.RunDir`; nothing of the trainer is imported.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from moegrok.analysis import pathways
from moegrok.config_values import check_fields
from moegrok.rundir import ProbeRecord, RunDir
from moegrok.theory._blas import single_threaded_blas
from moegrok.theory.kernel import TheoryError, effective_dimension, feature_effective_dimension

KERNELS = ("constant", "embedding")
ALL = "all"
_SUM_TOL = 0.02  # as the pathway module: token-mean softmax rows sum to 1 up to storage rounding


@dataclasses.dataclass(frozen=True)
class RunTheoryConfig:
    layer: int = -1  # MoE layer whose routing defines g (negative: from the end)
    lam_rel: float = 0.1  # λ = lam_rel · Tr(H)/n ...
    lam: float | None = None  # ... unless an absolute λ is given
    tau: float = 0.7  # METHOD §4 τ rule for the pathway distance reported beside d_eff
    encoding: str = "text"  # pathway encoding: text (the paper's) or expert
    per_domain: bool = True  # rows per domain besides "all"

    def __post_init__(self):
        # One place for the rules: `moegrok theory run` flags and a config's `theory:` section both land here, so
        # both name the field the same way (flag in parentheses).
        def bad(field, msg):
            raise TheoryError(f"theory.{field} (--{field.replace('_', '-')}) {msg}")

        check_fields(self, "theory", TheoryError)
        if self.lam is not None and not self.lam >= 0:
            bad("lam", f"must be >= 0, got {self.lam}")
        if not self.lam_rel >= 0:
            bad("lam_rel", f"must be >= 0, got {self.lam_rel}")
        if self.encoding not in pathways.ENCODINGS:
            bad("encoding", f"must be one of {pathways.ENCODINGS}, got {self.encoding!r}")
        if not 0 < self.tau <= 1:
            bad("tau", f"must be in (0, 1], got {self.tau}")

    def validate(self) -> "RunTheoryConfig":
        """Checked when built (kept for callers that chain it)."""
        return self


def _layer_index(layer: int, num_layers: int, where: str) -> int:
    if not -num_layers <= layer < num_layers:
        raise TheoryError(f"{where}: MoE layer {layer} out of range, the record has {num_layers} layers "
                          f"(field 'route_probs' [N, L, E])")
    return layer % num_layers


def routing_weights(probe: ProbeRecord, layer: int, where: str) -> np.ndarray:
    """``g [N, E]`` of one layer, checked to be a probability vector per sample."""
    ell = _layer_index(layer, probe.num_layers, where)
    g = np.asarray(probe.route_probs[:, ell, :], np.float64)
    if not np.all(np.isfinite(g)):
        raise TheoryError(f"{where}: field 'route_probs' has NaN or inf at layer {ell}")
    sums = g.sum(axis=1)
    if g.size and (g.min() < -1e-6 or np.abs(sums - 1).max() > _SUM_TOL):
        raise TheoryError(f"{where}: field 'route_probs' at layer {ell} is not a softmax (rows sum to "
                          f"[{sums.min():.4f}, {sums.max():.4f}], min {g.min():.3g}); expected rows summing to 1")
    return np.clip(g, 0.0, None)


def _lam(trace_over_n: float, cfg: RunTheoryConfig) -> float:
    return float(cfg.lam) if cfg.lam is not None else cfg.lam_rel * trace_over_n


def kernel_d_eff(g_NxE: np.ndarray, W_ExD: np.ndarray, kind: str, cfg: RunTheoryConfig) -> tuple[float, float]:
    """``(d_eff, λ)`` of the routing kernel with expert kernel `kind` on the samples of `g_NxE`."""
    n = g_NxE.shape[0]
    if kind == "constant":
        lam = _lam(float(np.sum(g_NxE ** 2)) / n, cfg)
        return feature_effective_dimension(g_NxE, lam), lam
    if kind == "embedding":
        Z_NxD = g_NxE @ W_ExD
        E, d = W_ExD.shape
        if E * d < n:  # H = Φ Φᵀ with Φ_i = g_i ⊗ z_i
            Phi = (g_NxE[:, :, None] * Z_NxD[:, None, :]).reshape(n, E * d)
            lam = _lam(float(np.sum(Phi ** 2)) / n, cfg)
            return feature_effective_dimension(Phi, lam), lam
        H = (g_NxE @ g_NxE.T) * (Z_NxD @ Z_NxD.T)
        lam = _lam(float(np.trace(H)) / n, cfg)
        return effective_dimension(H, lam), lam
    raise TheoryError(f"expert kernel must be one of {KERNELS}, got {kind!r}")


def _groups(probe: ProbeRecord, per_domain: bool) -> list[tuple[str, np.ndarray]]:
    order = np.argsort(probe.sample_ids, kind="stable")  # same rows in the same order at every checkpoint
    out = [(ALL, order)]
    if per_domain:
        doms = np.asarray(probe.domains).astype(str)
        for d in sorted(set(doms.tolist())):
            out.append((d, order[doms[order] == d]))
    return out


def _accuracy(ev, group: str) -> float:
    if group != ALL:
        return ev.accuracy.get(group, float("nan"))
    total = sum(len(c) for c in ev.correct.values())
    return sum(int(c.sum()) for c in ev.correct.values()) / total if total else float("nan")


def checkpoint_rows(rd: RunDir, step: int, cfg: RunTheoryConfig) -> list[dict[str, Any]]:
    probe, ev = rd.probe(step), rd.eval(step)
    where = f"{rd.path}/records step {step} probe.npz"
    g_all = routing_weights(probe, cfg.layer, where)
    ell = _layer_index(cfg.layer, probe.num_layers, where)
    W = np.asarray(probe.router_weights[ell], np.float64)
    rows = []
    for group, idx in _groups(probe, cfg.per_domain):
        n = int(idx.size)
        row: dict[str, Any] = {"step": step, "group": group, "layer": ell, "n": n}
        if n == 0:
            continue
        g = g_all[idx]
        for kind in KERNELS:
            d, lam = kernel_d_eff(g, W, kind, cfg)
            row.update({f"lam_{kind}": lam, f"d_eff_{kind}": d, f"d_eff_{kind}_norm": d / n})
        probs = probe.route_probs[idx]
        sat = pathways.saturation(probs, tau=cfg.tau)
        row["mean_kept_layer"] = float(sat.kept_L[ell])
        row["top1_weight_layer"] = float(sat.top1_weight_L[ell])
        if n >= 2:
            row["path_dist"] = pathways.pathway_distance(probs, tau=cfg.tau, encoding=cfg.encoding).mean_normalised
            row["path_dist_layer"] = float(pathways.layerwise_distance(
                probs, tau=cfg.tau, encoding=cfg.encoding).mean_normalised_L[ell])
        else:
            row["path_dist"] = row["path_dist_layer"] = "n/a"  # needs a pair of samples
        row["accuracy"] = _accuracy(ev, group)
        vl = ev.val_loss
        row["val_loss"] = vl.get(group, float("nan")) if group != ALL else (
            float(np.mean(list(vl.values()))) if vl else float("nan"))
        rows.append(row)
    return rows


def run_theory_rows(run_dir: str | Path, cfg: RunTheoryConfig, progress: bool = False) -> list[dict[str, Any]]:
    cfg.validate()
    rd = RunDir(run_dir)
    steps = rd.steps
    if not steps:
        raise TheoryError(f"{rd.path}/records: no complete checkpoint records (records/step_*/probe.npz + eval.json)")
    it: Iterable[int] = steps
    if progress:
        from tqdm import tqdm

        it = tqdm(steps, desc="theory run (checkpoints)", leave=False)
    rows: list[dict[str, Any]] = []
    with single_threaded_blas():
        for step in it:
            rows.extend(checkpoint_rows(rd, step, cfg))
    return rows
