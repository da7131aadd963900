"""`moegrok analyze`: every metric of SPEC §2-§6 for one run directory, written to ``RUN_DIR/analysis/``.

Stages (each either yields numbers or an "n/a: reason" that ends up in the outputs, never a crash or a bare NaN):

1. load the per-checkpoint series through :class:`moegrok.rundir.RunDir` (losses, routing, router weights, eval);
2. memorization (ε search, t*, Train@t*) per domain; generalization (t#, Test@t#), pairing and grokking lag;
3. consistency S, C, R for all checkpoints in one batched call;
4. per checkpoint (progress bar): pathway metrics of every group, through :func:`_pathway_metrics` only;
5. per-domain series -> correlation tables (+ control run); figures; report.md.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from moegrok.analysis import correlations as corr_mod
from moegrok.analysis.consistency import consistency_caveat, consistency_undefined_reason, pathway_consistency
from moegrok.analysis.generalization import LagPair, embed_texts, generalized_since, pair_groups
from moegrok.analysis.memorization import EpsilonChoice, MemorizationConfig, memorized_since, select_epsilon
from moegrok.errors import MoegrokError
from moegrok.rundir import RunDir

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    tau: float = 0.7  # SPEC §4 τ rule
    delta: float = 0.05  # SPEC §2
    epsilon: float | None = None  # fixed ε for every domain instead of the per-domain search
    embedding: str = "auto"  # "auto" | "minilm" | "tfidf"
    correction: str = "bh"  # "bh" | "holm"
    rise_fraction: float = corr_mod.RISE_FRACTION
    min_rise: float = corr_mod.MIN_RISE
    max_pair_samples: int = 4096  # SPEC §4 Decision: all pairs up to this many samples, then a fixed subsample
    seed: int = 0
    token_position: int | None = None  # also report the pathway distance of this one token position
    token_align: str = "position"  # token-level pairs: "position" (templated data) or "prefix" (free text)
    progress: bool = True
    figures: bool = True


# ----------------------------------------------------------------------------------------------------------------
# 1. Loading

@dataclasses.dataclass(frozen=True)
class RunData:
    run: RunDir
    steps: list[int]
    sample_ids: np.ndarray  # [N]
    domain_N: np.ndarray  # [N] str
    domains: list[str]
    loss_TxN: np.ndarray
    route_TxNxLxE: np.ndarray
    router_TxLxExD: np.ndarray
    accuracy: dict[str, np.ndarray]  # domain -> [T], NaN where the eval lacks the domain
    val_loss: dict[str, np.ndarray]  # domain -> [T]
    correct: dict[str, np.ndarray]  # domain -> [T, M] bool
    test_ids: dict[str, list]
    probe_text: list[str] | None  # [N] from probes.jsonl, None if missing/mismatched
    test_text: dict[str, list[str]] | None  # domain -> [M] prompt + answer
    notes: list[str]

    @property
    def num_layers(self) -> int:
        return self.route_TxNxLxE.shape[2]

    @property
    def num_experts(self) -> int:
        return self.route_TxNxLxE.shape[3]


def load_run(path: str | os.PathLike, progress: bool = False) -> RunData:
    from tqdm.auto import tqdm

    rd = RunDir(path)
    steps = rd.steps
    if not steps:
        raise MoegrokError(f"{rd.path / 'records'}: no complete checkpoint record (records/step_*/ with probe.npz "
                           "and eval.json); nothing to analyse yet")
    notes = []
    if not rd.finished:
        notes.append(f"provisional: {rd.path / 'meta.json'} says finished=false (run still being written or "
                     f"interrupted); analysed the {len(steps)} complete checkpoints, the latest (step {steps[-1]}) "
                     "standing in for the last one")
    loss, route, router, evals = [], [], [], []
    first = None
    for s in tqdm(steps, desc="loading records", disable=not progress, leave=False):
        p = rd.probe(s)
        if first is None:
            first = p
        elif p.sample_ids.shape != first.sample_ids.shape or (p.sample_ids != first.sample_ids).any():
            raise MoegrokError(f"{rd.path}/records step {s}: probe sample_ids differ from step {steps[0]}; the probe "
                               "set must be the same at every checkpoint")
        elif p.route_probs.shape[1:] != first.route_probs.shape[1:]:
            raise MoegrokError(f"{rd.path}/records step {s}: route_probs shape {p.route_probs.shape} differs from "
                               f"step {steps[0]} ({first.route_probs.shape})")
        loss.append(p.sample_loss)
        route.append(p.route_probs)
        router.append(p.router_weights)
        evals.append(rd.eval(s))
    domain_N = first.domains.astype(str)
    test_domains = sorted({d for e in evals for d in e.accuracy})
    domains = sorted(set(domain_N.tolist()) | set(test_domains))
    T = len(steps)
    accuracy, val_loss, correct, test_ids = {}, {}, {}, {}
    for d in domains:
        accuracy[d] = np.array([e.accuracy.get(d, NAN) for e in evals])
        val_loss[d] = np.array([e.val_loss.get(d, NAN) for e in evals])
        ids = [e.test_ids.get(d) for e in evals]
        if all(i is not None for i in ids):
            if any(i != ids[0] for i in ids):
                raise MoegrokError(f"{rd.path}/records: eval.json test ids of domain '{d}' differ between "
                                   "checkpoints; the test set must be fixed")
            correct[d] = np.stack([e.correct[d] for e in evals]) if T else np.zeros((0, 0), bool)
            test_ids[d] = ids[0]
        elif any(i is not None for i in ids):
            notes.append(f"domain '{d}': test results missing at some checkpoints; t# and lag n/a")
    probe_text = _probe_texts(rd, first.sample_ids, domain_N, notes)
    test_text = _test_texts(rd, test_ids, notes)
    return RunData(rd, steps, first.sample_ids, domain_N, domains, np.stack(loss).astype(np.float64),
                   np.stack(route), np.stack(router), accuracy, val_loss, correct, test_ids, probe_text, test_text,
                   notes)


def _probe_texts(rd: RunDir, sample_ids, domain_N, notes) -> list[str] | None:
    rows = rd.probes
    if len(rows) != len(sample_ids):
        notes.append(f"{rd.path / 'probes.jsonl'}: {len(rows)} lines for {len(sample_ids)} probe samples; "
                     "pairing n/a")
        return None
    for i, r in enumerate(rows):
        if r.get("domain") != domain_N[i] or "text" not in r:
            notes.append(f"{rd.path / 'probes.jsonl'}:{i + 1}: domain/text does not match probe row {i}; "
                         "pairing n/a")
            return None
    return [str(r["text"]) for r in rows]


def _test_texts(rd: RunDir, test_ids: Mapping[str, list], notes) -> dict[str, list[str]] | None:
    by_id = {(r.get("domain"), r.get("id")): r for r in rd.tests}
    out = {}
    for d, ids in test_ids.items():
        missing = [i for i in ids if (d, i) not in by_id]
        if missing:
            notes.append(f"{rd.path / 'tests.jsonl'}: {len(missing)} test ids of domain '{d}' missing "
                         f"(e.g. {missing[0]!r}); pairing n/a")
            return None
        out[d] = [f"{by_id[(d, i)].get('prompt', '')} {by_id[(d, i)].get('answer', '')}".strip() for i in ids]
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. Memorization, generalization, lag

@dataclasses.dataclass(frozen=True)
class DomainResult:
    domain: str
    sample_idx: np.ndarray  # global probe rows of the domain
    epsilon: EpsilonChoice | None
    t_star: np.ndarray  # [n_domain] checkpoint index, -1 never
    mem_note: str | None
    t_hash: np.ndarray | None  # [M] checkpoint index, -1 never
    gen_note: str | None
    pairs: list[LagPair]
    similarity: np.ndarray | None
    train_groups: list[int]
    test_groups: list[int]
    pair_note: str | None


def _memorization(data: RunData, d: str, cfg: AnalysisConfig):
    idx = np.flatnonzero(data.domain_N == d)
    if idx.size == 0:
        return idx, None, np.zeros(0, np.int64), "n/a: no probe samples in this domain"
    if len(data.steps) < 2:
        return idx, None, np.full(idx.size, -1), "n/a: memorization needs at least 2 checkpoints"
    loss = data.loss_TxN[:, idx]
    mcfg = MemorizationConfig(delta=cfg.delta, epsilon=cfg.epsilon)
    eps = select_epsilon(loss, mcfg)
    t_star = memorized_since(loss, eps.epsilon, cfg.delta)
    note = None if (t_star >= 0).any() else f"n/a: no sample memorized before the last checkpoint at {eps.describe()}"
    bad = int((~np.isfinite(loss)).any(axis=0).sum())
    if bad:
        note = (note + "; " if note else "") + f"{bad} sample(s) with non-finite loss never count as memorized"
    return idx, eps, t_star, note


def analyze_domains(data: RunData, cfg: AnalysisConfig) -> tuple[list[DomainResult], str]:
    """Memorization and generalization per domain, then the pairing of their groups. Returns the embedding used."""
    pre = []
    for d in data.domains:
        idx, eps, t_star, mem_note = _memorization(data, d, cfg)
        if d in data.correct:
            t_hash, gen_note = generalized_since(data.correct[d]), None
            if not (t_hash >= 0).any():
                gen_note = "n/a: no test item generalized (mean accuracy > 0.8, at most one error, to the end)"
        else:
            t_hash, gen_note = None, "n/a: no test results for this domain"
        pre.append((d, idx, eps, t_star, mem_note, t_hash, gen_note))
    embedding = "none (nothing to pair)"
    emb = None
    need = [p for p in pre if (p[3] >= 0).any() and p[5] is not None and (p[5] >= 0).any()]
    if need and data.probe_text is not None and data.test_text is not None:
        # One fit over every text so all domains share one vector space (matters for TF-IDF's vocabulary).
        texts = list(data.probe_text) + [t for d in data.domains for t in data.test_text.get(d, [])]
        X, embedding = embed_texts(texts, cfg.embedding)
        emb = X
    out = []
    offset = len(data.sample_ids)
    for d, idx, eps, t_star, mem_note, t_hash, gen_note in pre:
        m = len(data.test_text.get(d, [])) if data.test_text else 0
        rows_test = np.arange(offset, offset + m)
        offset += m
        pairs, sim, ps, qs, note = [], None, [], [], None
        if mem_note and mem_note.startswith("n/a") or gen_note:
            note = "n/a: needs memorized training groups and generalized test groups"
        elif emb is None:
            note = "n/a: probe/test texts unavailable (see notes)"
        else:
            pairs, sim, ps, qs = pair_groups(d, data.steps, emb[idx], t_star, emb[rows_test], t_hash)
        out.append(DomainResult(d, idx, eps, t_star, mem_note, t_hash, gen_note, pairs, sim, ps, qs, note))
    return out, embedding


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Per-checkpoint metrics

PATHWAY_FIELDS = ("path_text", "path_text_norm", "path_expert", "path_expert_norm", "path_token",
                  "path_position", "kept_per_layer", "top1_weight", "entropy", "saturated")


def _pathway_backend():
    import importlib

    try:
        pathways = importlib.import_module("moegrok.analysis.pathways")
    except ModuleNotFoundError as e:
        if e.name not in ("moegrok.analysis.pathways", "moegrok.analysis.levenshtein"):
            raise
        return None
    return pathways


def _pathway_metrics(probe, groups: Mapping[Any, np.ndarray], cross: Mapping[Any, tuple[np.ndarray, np.ndarray]],
                     cfg: AnalysisConfig) -> tuple[dict[Any, dict[str, Any]], dict[Any, list[dict]]]:
    """THE one place that calls moegrok.analysis.pathways. For each group: mean pairwise distances and saturation
    diagnostics (PATHWAY_FIELDS; a str value is an "n/a: reason"); for each cross entry the mean distance between
    the two sample sets. Also, per group, one dict per layer (layer-wise distance and saturation)."""
    pw = _pathway_backend()
    if pw is None:
        na = {f: "n/a: moegrok.analysis.pathways not available" for f in PATHWAY_FIELDS}
        return {g: dict(na) for g in list(groups) + list(cross)}, {}
    E = probe.num_experts
    pairs = {"max_all_pairs": cfg.max_pair_samples, "seed": cfg.seed}
    out, layers = {}, {}
    for key, idx in groups.items():
        rp = probe.route_probs[idx]
        sat = pw.saturation(rp, tau=cfg.tau)
        m: dict[str, Any] = {"kept_per_layer": sat.mean_kept, "top1_weight": float(sat.top1_weight_L.mean()),
                             "entropy": float(sat.entropy_L.mean()), "saturated": sat.saturated}
        per_layer = [{"kept": float(sat.kept_L[l]), "top1_weight": float(sat.top1_weight_L[l]),
                      "entropy": float(sat.entropy_L[l]), "distance": "n/a: fewer than 2 samples"}
                     for l in range(rp.shape[1])]
        if idx.size < 2:
            m.update({f: "n/a: group has 1 sample (no pairs)" for f in PATHWAY_FIELDS[:6]})
        else:
            for enc in ("text", "expert"):
                d = pw.pathway_distance(rp, tau=cfg.tau, encoding=enc, **pairs)
                m[f"path_{enc}"], m[f"path_{enc}_norm"] = d.mean, d.mean_normalised
            lw = pw.layerwise_distance(rp, tau=cfg.tau, encoding="text", **pairs)
            for l, v in enumerate(lw.mean_L):
                per_layer[l]["distance"] = float(v)
            m["path_token"] = _guarded(lambda: pw.token_pathway_distance(
                probe.topk_ids[idx], probe.token_mask[idx], E, align=cfg.token_align, **pairs).mean, pw)
            if cfg.token_position is None:
                m["path_position"] = "n/a: no --token-position given"
            else:
                m["path_position"] = _guarded(lambda: pw.mean_pair_distance(pw.position_pathways(
                    probe.topk_ids[idx], probe.token_mask[idx], cfg.token_position, E), **pairs).mean, pw)
        out[key], layers[key] = m, per_layer
    for key, (a, b) in cross.items():
        m = {f: "n/a: cross-domain pairs report the sample-level distance only" for f in PATHWAY_FIELDS}
        for enc in ("text", "expert"):
            d = pw.mean_cross_distance(pw.encode_pathways(probe.route_probs[a], cfg.tau, enc),
                                       pw.encode_pathways(probe.route_probs[b], cfg.tau, enc), **pairs)
            m[f"path_{enc}"], m[f"path_{enc}_norm"] = d.mean, d.mean_normalised
        out[key] = m
    return out, layers


def _guarded(fn, pw) -> float | str:
    """A token-level distance, or its n/a reason when the record cannot give one (e.g. the position is padding)."""
    try:
        return float(fn())
    except pw.PathwayError as e:
        return f"n/a: {e}"


def _mean_or_na(v: np.ndarray, what: str) -> float | str:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else f"n/a: {what}"


Group = tuple[str, str]  # (domain, group name)


def analysis_groups(data: RunData, doms: Sequence[DomainResult]) -> dict[Group, tuple[np.ndarray, np.ndarray | None]]:
    """(domain, group) -> (probe rows, other rows or None), fixed for the whole run. Groups: "domain" (every probe
    sample of the domain: loss and consistency only, SPEC §4 restricts pathways to memorized samples), "memorized"
    (memorized before the last checkpoint), "Train@<step>", and "cross-domain" (this domain's memorized samples
    against those of the other domains: the control where no decline is expected)."""
    mem_all = np.concatenate([dr.sample_idx[dr.t_star >= 0] for dr in doms]) if doms else np.zeros(0, np.int64)
    out: dict[Group, tuple[np.ndarray, np.ndarray | None]] = {}
    for dr in doms:
        mem = dr.sample_idx[dr.t_star >= 0]
        out[(dr.domain, "domain")] = (dr.sample_idx, None)
        out[(dr.domain, "memorized")] = (mem, None)
        for p in np.unique(dr.t_star[dr.t_star >= 0]):
            out[(dr.domain, f"Train@{data.steps[p]}")] = (dr.sample_idx[dr.t_star == p], None)
        other = np.setdiff1d(mem_all, mem)
        if mem.size and other.size:
            out[(dr.domain, "cross-domain")] = (mem, other)
    return out


VALUE_FIELDS = ("loss_mean", "S_mean", "C_mean", "R_mean") + PATHWAY_FIELDS


def _group_row(c: int, step: int, key: Group, idx: np.ndarray, other: np.ndarray | None, data: RunData,
               cons, cons_reason: str | None, pw_values: Mapping[str, Any] | None) -> dict:
    d, g = key
    row: dict[str, Any] = {"step": step, "checkpoint": c, "domain": d, "group": g, "n_samples": int(idx.size)}
    if idx.size == 0:
        why = "n/a: no sample memorized before the last checkpoint"
        return row | {f: why for f in VALUE_FIELDS} | {"note": why}
    notes = []
    if other is not None:
        notes.append(f"pairs between this domain's {idx.size} memorized samples and the {other.size} of the "
                     "other domains")
    else:
        row["loss_mean"] = _mean_or_na(data.loss_TxN[c, idx], "no finite loss")
        if cons_reason:
            row.update(S_mean=cons_reason, C_mean=cons_reason, R_mean=cons_reason)
        else:
            s = cons.S_BxN[c, idx]
            row.update(S_mean=_mean_or_na(s, f"S undefined for all {idx.size} samples (max cosine <= 0.05)"),
                       C_mean=_mean_or_na(cons.C_BxN[c, idx], f"C undefined for all {idx.size} samples"),
                       R_mean=float(cons.R_BxN[c, idx].mean()), S_n_na=int(np.isnan(s).sum()))
    if g == "domain":
        row.update({f: "not computed: pathways use memorized samples only (SPEC §4)" for f in PATHWAY_FIELDS})
    elif pw_values is not None:
        row.update(pw_values)
        if idx.size == 1 and other is None:
            notes.append("group has 1 sample: no pairs, distances n/a")
    row["note"] = "; ".join(notes)
    return row


def checkpoint_metrics(data: RunData, doms: Sequence[DomainResult], cfg: AnalysisConfig):
    """Rows of (checkpoint, domain, group) metrics (see :func:`analysis_groups`), layer-wise rows, and the
    consistency of every (checkpoint, sample) (None when undefined for this model)."""
    from tqdm.auto import tqdm

    cons_reason = consistency_undefined_reason(data.num_layers)
    cons = None if cons_reason else pathway_consistency(data.route_TxNxLxE, data.router_TxLxExD)
    groups = analysis_groups(data, doms)
    pw_groups = {k: idx for k, (idx, other) in groups.items() if other is None and k[1] != "domain" and idx.size}
    cross = {k: v for k, v in groups.items() if v[1] is not None}
    rows, layer_rows = [], []
    for c, step in enumerate(tqdm(data.steps, desc="pathway metrics", disable=not cfg.progress)):
        pw, layer = (_pathway_metrics(data.run.probe(step), pw_groups, cross, cfg) if (pw_groups or cross)
                     else ({}, {}))
        for key, (idx, other) in groups.items():
            rows.append(_group_row(c, step, key, idx, other, data, cons, cons_reason, pw.get(key)))
            layer_rows += [{"step": step, "checkpoint": c, "domain": key[0], "group": key[1], "layer": l, **v}
                           for l, v in enumerate(layer.get(key, []))]
    return rows, layer_rows, cons


# ----------------------------------------------------------------------------------------------------------------
# 5. Series and correlations

METRICS = (  # (name in tables, group, column) - the display order of Table 1
    ("pathway distance (text)", "memorized", "path_text"),
    ("pathway distance (text, normalised)", "memorized", "path_text_norm"),
    ("pathway distance (expert)", "memorized", "path_expert"),
    ("pathway distance (token)", "memorized", "path_token"),
    ("pathway distance (token position)", "memorized", "path_position"),  # only with --token-position
    ("consistency S", "memorized", "S_mean"),
    ("complexity C", "memorized", "C_mean"),
    ("raw consistency R", "memorized", "R_mean"),
    ("training loss (memorized)", "memorized", "loss_mean"),
    ("training loss (domain)", "domain", "loss_mean"),
    ("training loss MA3 (memorized)", "memorized", "loss_ma3"),
    ("validation loss", None, "val_loss"),
)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) else NAN


def _metrics_for(cfg: AnalysisConfig) -> tuple:
    return tuple(m for m in METRICS if cfg.token_position is not None or m[2] != "path_position")


def domain_series(data: RunData, rows: Sequence[dict], metrics: Sequence[tuple] = METRICS):
    """domain -> metric name -> [T] (NaN where n/a at that checkpoint; correlate() drops and counts those), and
    domain -> metric name -> the n/a reason when the metric has no value at any checkpoint."""
    T = len(data.steps)
    out, why = {}, {}
    for d in data.domains:
        by = {(r["group"], r["checkpoint"]): r for r in rows if r["domain"] == d}
        s, w = {}, {}
        for name, group, col in metrics:
            if col == "val_loss":
                s[name] = data.val_loss[d]
                w[name] = "n/a: eval.json has no validation loss for this domain"
            elif col == "loss_ma3":
                s[name] = corr_mod.moving_average(s["training loss (memorized)"], 3)
                w[name] = w["training loss (memorized)"]
            else:
                cells = [by.get((group, c), {}).get(col) for c in range(T)]
                s[name] = np.array([_num(v) for v in cells])
                w[name] = next((v for v in cells if isinstance(v, str) and v.startswith("n/a")),
                               f"n/a: no {group} samples" if group == "memorized" else "n/a: no value")
        out[d] = s
        why[d] = {m: w[m] for m in s if not np.isfinite(s[m]).any()}
    return out, why


def correlation_rows(steps: Sequence[int], series: Mapping[str, Mapping[str, np.ndarray]],
                     accuracy: Mapping[str, np.ndarray], windows: Mapping[str, Mapping[str, int | None]],
                     why: Mapping[str, Mapping[str, str]] | None = None):
    """Rows for every domain x window ("all", "rise") x metric x kind. `windows[domain][window]` is the first
    checkpoint index of the window (None: window n/a, given as an n/a row); `why[domain][metric]` the reason for a
    metric that has no value anywhere."""
    rows = []
    st = np.asarray(steps, dtype=np.float64)
    for d, metrics in series.items():
        acc = accuracy.get(d)
        for w in ("all", "rise"):
            start = windows[d].get(w)
            missing = (why or {}).get(d, {})
            if missing:
                rows += [corr_mod.CorrRow(d, w, m, k, corr_mod.Corr(0, note=missing[m])) for m in missing
                         for k in corr_mod.KINDS]
                metrics = {m: v for m, v in metrics.items() if m not in missing}
            if acc is None or not np.isfinite(acc).any():
                rows += [corr_mod.CorrRow(d, w, m, k, corr_mod.Corr(0, note="n/a: no test accuracy for this domain"))
                         for m in metrics for k in corr_mod.KINDS]
            elif start is None:
                reason = windows[d].get(f"{w}_why", "n/a: window undefined")
                rows += [corr_mod.CorrRow(d, w, m, k, corr_mod.Corr(0, note=reason)) for m in metrics
                         for k in corr_mod.KINDS]
            else:
                rows += corr_mod.correlate_series(d, w, {m: v[start:] for m, v in metrics.items()}, acc[start:],
                                                  st[start:])
    return rows


def _windows(data: RunData, cfg: AnalysisConfig) -> dict[str, dict[str, Any]]:
    out = {}
    for d in data.domains:
        start, why = corr_mod.sustained_rise_start(data.accuracy[d], cfg.rise_fraction, cfg.min_rise)
        out[d] = {"all": 0, "rise": start, "rise_why": why}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Whole analysis

@dataclasses.dataclass(frozen=True)
class Analysis:
    data: RunData
    config: AnalysisConfig
    domains: list[DomainResult]
    embedding: str
    rows: list[dict]
    layer_rows: list[dict]
    consistency_note: str | None
    series: dict[str, dict[str, np.ndarray]]
    series_why: dict[str, dict[str, str]]
    windows: dict[str, dict[str, Any]]
    correlations: list[corr_mod.CorrRow]
    notes: list[str]


def compute_analysis(run_dir: str | os.PathLike, cfg: AnalysisConfig = AnalysisConfig(),
                     control: "Analysis | None" = None) -> Analysis:
    data = load_run(run_dir, cfg.progress)
    notes = list(data.notes)
    if len(data.steps) < 3:
        notes.append(f"n/a: only {len(data.steps)} checkpoint(s): correlations need at least 3")
    doms, embedding = analyze_domains(data, cfg)
    rows, layer_rows, cons = checkpoint_metrics(data, doms, cfg)
    cons_note = consistency_undefined_reason(data.num_layers) or consistency_caveat(data.num_layers)
    if cons is not None and cons.num_s_undefined:
        cons_note = "; ".join(filter(None, [cons_note, cons.undefined_reason()]))
    series, series_why = domain_series(data, rows, _metrics_for(cfg))
    windows = _windows(data, cfg)
    crows = correlation_rows(data.steps, series, data.accuracy, windows, series_why)
    crows = corr_mod.correct_rows(crows, cfg.correction)
    if control is not None:
        crows = corr_mod.compare_with_control(crows, control_rows(data, windows, control))
    return Analysis(data, cfg, doms, embedding, rows, layer_rows, cons_note, series, series_why, windows, crows,
                    notes)


def control_rows(data: RunData, windows, control: Analysis) -> list[corr_mod.CorrRow]:
    """The control run's series correlated with *this* run's accuracy on the checkpoints both have."""
    common = sorted(set(data.steps) & set(control.data.steps))
    ia = [data.steps.index(s) for s in common]
    ib = [control.data.steps.index(s) for s in common]
    series, acc, wins = {}, {}, {}
    for d in data.domains:
        if d not in control.series:
            continue
        series[d] = {m: v[ib] for m, v in control.series[d].items()}
        acc[d] = data.accuracy[d][ia]
        wins[d] = {"all": 0}
        start = windows[d]["rise"]
        if start is None:
            wins[d].update(rise=None, rise_why=windows[d]["rise_why"])
        else:
            first = [k for k, s in enumerate(common) if s >= data.steps[start]]
            wins[d]["rise"] = first[0] if first else None
            wins[d]["rise_why"] = "n/a: the control has no checkpoint in this run's rise window"
    return correlation_rows(common, series, acc, wins, control.series_why)


def analyze(run_dir: str | os.PathLike, cfg: AnalysisConfig = AnalysisConfig(),
            control_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Run the whole analysis and write it; returns the output directory (default RUN_DIR/analysis)."""
    ctl = None
    if control_dir is not None:
        ctl = compute_analysis(control_dir, dataclasses.replace(cfg, figures=False))
    a = compute_analysis(run_dir, cfg, ctl)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    return write_outputs(a, out, control_dir)


# ----------------------------------------------------------------------------------------------------------------
# Writing: CSV, Markdown, JSON

def _cell(v) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else f"{float(v):.6g}"
    return v


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k, "")) for k in fields})


METRIC_FIELDS = ("step", "checkpoint", "domain", "group", "n_samples", "loss_mean", "S_mean", "S_n_na", "C_mean",
                 "R_mean") + PATHWAY_FIELDS + ("note",)


def _fmt(v, spec=".3g") -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    v = _num(v)
    return "n/a" if not math.isfinite(v) else format(v, spec)


def _step_of(data: RunData, idx: int) -> str:
    return "never" if idx < 0 else str(data.steps[idx])


def summary_dict(a: Analysis) -> dict:
    d = a.data
    return {
        "run_dir": str(d.run.path), "finished": d.run.finished, "steps": d.steps,
        "num_layers": d.num_layers, "num_experts": d.num_experts, "config": dataclasses.asdict(a.config),
        "embedding": a.embedding, "correction": corr_mod.CORRECTION_NAMES[a.config.correction],
        "consistency_note": a.consistency_note, "notes": a.notes,
        "domains": {
            dr.domain: {
                "samples": int(dr.sample_idx.size),
                "epsilon": None if dr.epsilon is None else dr.epsilon.epsilon,
                "memorized_share": None if dr.epsilon is None else dr.epsilon.share,
                "epsilon_in_target": None if dr.epsilon is None else dr.epsilon.in_target,
                "epsilon_grid": None if dr.epsilon is None else [list(g) for g in dr.epsilon.grid],
                "memorized": int((dr.t_star >= 0).sum()), "memorization_note": dr.mem_note,
                "test_items": 0 if dr.t_hash is None else int(dr.t_hash.size),
                "generalized": 0 if dr.t_hash is None else int((dr.t_hash >= 0).sum()),
                "generalization_note": dr.gen_note, "pairing_note": dr.pair_note,
                "lags": [dataclasses.asdict(p) | {"lag_steps": p.lag_steps} for p in dr.pairs],
                "rise_window": a.windows[dr.domain]["rise_why"],
            } for dr in a.domains},
    }


def write_outputs(a: Analysis, out: Path, control_dir=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    d = a.data
    write_csv(out / "metrics.csv", a.rows, METRIC_FIELDS)
    write_csv(out / "layerwise.csv", a.layer_rows, ("step", "checkpoint", "domain", "group", "layer", "distance",
                                                    "kept", "top1_weight", "entropy"))
    samples = [{"sample_id": int(d.sample_ids[i]), "domain": dr.domain, "t_star_step": _step_of(d, int(t)),
                "epsilon": "" if dr.epsilon is None else dr.epsilon.epsilon}
               for dr in a.domains for i, t in zip(dr.sample_idx, dr.t_star)]
    write_csv(out / "samples.csv", samples, ("sample_id", "domain", "t_star_step", "epsilon"))
    items = [{"test_id": tid, "domain": dr.domain, "t_hash_step": _step_of(d, int(t))}
             for dr in a.domains if dr.t_hash is not None for tid, t in zip(d.test_ids[dr.domain], dr.t_hash)]
    write_csv(out / "test_items.csv", items, ("test_id", "domain", "t_hash_step"))
    lag_rows = [dataclasses.asdict(p) | {"lag_steps": p.lag_steps, "lag_checkpoints": p.lag_checkpoints,
                                        "embedding": a.embedding} for dr in a.domains for p in dr.pairs]
    write_csv(out / "lag.csv", lag_rows, ("domain", "train_step", "test_step", "lag_steps", "lag_checkpoints",
                                          "train_index", "test_index", "similarity", "n_train", "n_test",
                                          "embedding"))
    write_csv(out / "correlations.csv", [corr_mod.row_dict(r) for r in a.correlations], corr_mod.CSV_FIELDS)
    (out / "correlations.md").write_text(correlation_markdown(a, control_dir))
    (out / "summary.json").write_text(json.dumps(summary_dict(a), indent=1, default=_json_default))
    figs = write_figures(a, out / "figures") if a.config.figures else {}
    (out / "report.md").write_text(report_markdown(a, figs, control_dir))
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


TABLES = (("all", "raw", "all checkpoints"), ("rise", "raw", "from the start of the sustained accuracy rise"),
          ("all", "diff", "first differences, all checkpoints"),
          ("all", "partial", "partial correlation controlling for the training step, all checkpoints"))


def correlation_markdown(a: Analysis, control_dir=None) -> str:
    method = corr_mod.CORRECTION_NAMES[a.config.correction]
    order = [m for m, _, _ in METRICS]
    parts = [f"Correlation of each per-checkpoint metric with the domain's test accuracy. r = Pearson, ρ = Spearman, "
             f"p two-sided, 'adj' = {method}-adjusted within each table (Pearson and Spearman separately), n = "
             "checkpoints used. Metrics are over the samples memorized before the last checkpoint unless named "
             "otherwise."]
    if control_dir is not None:
        parts.append(f"⚠ same in control: the control run ({control_dir}) correlates with this run's accuracy with "
                     "the same sign, at least half the strength and |r| >= 0.3 (Pearson): the metric tracks training "
                     "time.")
    for w, k, title in TABLES:
        parts.append(f"### {title}\n\n{corr_mod.markdown_table(a.correlations, w, k, order)}")
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib Agg). Each returns one sentence of reading per figure for report.md.

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _subplots(n: int, title: str):
    plt = _plt()
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5.2 * max(n, 1), 3.8), squeeze=False)
    fig.suptitle(title)
    return plt, fig, axes[0]


def _na_text(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _rows_of(a: Analysis, domain: str, group: str) -> list[dict]:
    return sorted((r for r in a.rows if r["domain"] == domain and r["group"] == group), key=lambda r: r["checkpoint"])


def _col(rows: Sequence[dict], col: str) -> np.ndarray:
    return np.array([_num(r.get(col)) for r in rows])


def _change(v: np.ndarray) -> str:
    f = v[np.isfinite(v)]
    return "n/a" if f.size == 0 else f"{f[0]:.3g} → {f[-1]:.3g}"


def fig_memorized_vs_accuracy(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data
    plt, fig, axes = _subplots(len(a.domains), "Memorized probe samples vs test accuracy")
    reading = []
    for ax, dr in zip(axes, a.domains):
        count = np.array([int(((dr.t_star >= 0) & (dr.t_star <= c)).sum()) for c in range(len(d.steps))])
        ax.plot(d.steps, count, "o-", color="tab:blue", label="memorized samples")
        ax.set_xlabel("training step")
        ax.set_ylabel("memorized samples (count)")
        eps = "" if dr.epsilon is None else f", ε={dr.epsilon.epsilon:g}"
        ax.set_title(f"{dr.domain}{eps}")
        ax2 = ax.twinx()
        acc = d.accuracy[dr.domain]
        ax2.plot(d.steps, acc, "s--", color="tab:red", label="test accuracy")
        ax2.set_ylabel("test accuracy")
        ax2.set_ylim(-0.02, 1.02)
        if (dr.t_star >= 0).any() and np.isfinite(acc).any():
            last_mem = d.steps[int(dr.t_star.max())]
            reading.append(f"{dr.domain}: {int(count[-1])} of {dr.sample_idx.size} samples memorized, the last "
                           f"from step {last_mem}, while test accuracy goes {_change(acc)}")
        else:
            reading.append(f"{dr.domain}: {dr.mem_note or dr.gen_note or 'n/a'}")
    return _save(plt, fig, path), "; ".join(reading) + "."


def fig_lag(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data
    plt, fig, axes = _subplots(len(a.domains), "Train@p (loss) → Test@q (accuracy) with the grokking lag")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    reading = []
    for ax, dr in zip(axes, a.domains):
        ax.set_xlabel("training step")
        ax.set_ylabel("mean probe loss of Train@p (solid)")
        ax.set_title(dr.domain)
        if not dr.pairs:
            _na_text(ax, dr.pair_note or "n/a: no matched groups")
            reading.append(f"{dr.domain}: {dr.pair_note or 'no matched groups'}")
            continue
        ax2 = ax.twinx()
        ax2.set_ylabel("accuracy of Test@q (dashed)")
        ax2.set_ylim(-0.02, 1.02)
        for i, p in enumerate(dr.pairs):
            col = colors[i % len(colors)]
            mem = dr.sample_idx[dr.t_star == p.train_index]
            ax.plot(d.steps, d.loss_TxN[:, mem].mean(axis=1), "-", color=col)
            items = np.flatnonzero(dr.t_hash == p.test_index)
            ax2.plot(d.steps, d.correct[dr.domain][:, items].mean(axis=1), "--", color=col)
            ax.axvline(p.train_step, color=col, ls=":", lw=1)
            ax.axvline(p.test_step, color=col, ls=":", lw=1)
            y = ax.get_ylim()[1] * (0.9 - 0.08 * (i % 8))
            ax.annotate("", xy=(p.test_step, y), xytext=(p.train_step, y),
                        arrowprops={"arrowstyle": "->", "color": col})
            ax.text((p.train_step + p.test_step) / 2, y, f"lag {p.lag_steps}", color=col, ha="center",
                    va="bottom", fontsize=8)
        lags = ", ".join(f"Train@{p.train_step}→Test@{p.test_step} ({p.lag_steps:+d})" for p in dr.pairs)
        reading.append(f"{dr.domain}: {lags}")
    return _save(plt, fig, path), "Matched groups and lags in steps — " + "; ".join(reading) + "."


def fig_distance_vs_loss(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data
    plt, fig, axes = _subplots(len(a.domains), "Pathway distance (text, solid) vs probe loss (dashed) per group")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    reading = []
    for ax, dr in zip(axes, a.domains):
        ax.set_xlabel("training step")
        ax.set_ylabel("mean pairwise pathway distance")
        ax2 = ax.twinx()
        ax2.set_ylabel("mean probe loss")
        groups = ["memorized"] + [f"Train@{d.steps[p]}" for p in np.unique(dr.t_star[dr.t_star >= 0])]
        drew = False
        for i, g in enumerate(groups):
            rows = _rows_of(a, dr.domain, g)
            dist = _col(rows, "path_text")
            col = colors[i % len(colors)]
            if np.isfinite(dist).any():
                ax.plot(d.steps, dist, "o-", color=col, label=g, lw=2 if g == "memorized" else 1)
                drew = True
            ax2.plot(d.steps, _col(rows, "loss_mean"), "--", color=col, lw=1)
        mem = _rows_of(a, dr.domain, "memorized")
        sat = mem[-1] if mem else {}
        ax.set_title(f"{dr.domain} (last: {_fmt(sat.get('kept_per_layer'))} of {d.num_experts} experts kept/layer)",
                     fontsize=9)
        if drew:
            ax.legend(fontsize=7)
            reading.append(f"{dr.domain}: memorized-sample distance {_change(_col(mem, 'path_text'))} while their "
                           f"loss goes {_change(_col(mem, 'loss_mean'))} (saturated at the last checkpoint: "
                           f"{_fmt(sat.get('saturated'))})")
        else:
            why = next((r.get("path_text") for r in mem if isinstance(r.get("path_text"), str)),
                       dr.mem_note or "n/a: no memorized samples")
            _na_text(ax, str(why))
            reading.append(f"{dr.domain}: distance {why}")
    return _save(plt, fig, path), "; ".join(reading) + "."


def fig_layerwise(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data
    plt, fig, axes = _subplots(len(a.domains), "Layer-wise pathway distance of memorized samples")
    reading = []
    for ax, dr in zip(axes, a.domains):
        ax.set_xlabel("training step")
        ax.set_ylabel("mean pairwise distance in the layer")
        ax.set_title(dr.domain)
        rows = [r for r in a.layer_rows if r["domain"] == dr.domain and r["group"] == "memorized"]
        if not rows:
            _na_text(ax, "n/a: no layer-wise distances (no memorized pairs or pathways unavailable)")
            reading.append(f"{dr.domain}: n/a")
            continue
        drops = []
        for layer in sorted({r["layer"] for r in rows}):
            v = np.full(len(d.steps), NAN)
            for r in rows:
                if r["layer"] == layer:
                    v[r["checkpoint"]] = _num(r["distance"])
            ax.plot(d.steps, v, "o-", label=f"layer {layer}")
            f = v[np.isfinite(v)]
            if f.size:
                drops.append((f[-1] - f[0], layer, _change(v)))
        ax.legend(fontsize=7)
        if drops:
            ch, layer, txt = min(drops)
            reading.append(f"{dr.domain}: the largest fall is in layer {layer} ({txt})" if ch < 0 else
                           f"{dr.domain}: no layer's distance falls (smallest rise: layer {layer}, {txt})")
    return _save(plt, fig, path), "; ".join(reading) + "."


def fig_consistency(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data
    plt, fig, axes = _subplots(len(a.domains), "Consistency of memorized samples vs their probe loss")
    reading = []
    for ax, dr in zip(axes, a.domains):
        ax.set_xlabel("training step")
        ax.set_ylabel("consistency (S, R)")
        ax.set_title(dr.domain)
        rows = _rows_of(a, dr.domain, "memorized")
        S, R = _col(rows, "S_mean"), _col(rows, "R_mean")
        if not (np.isfinite(S).any() or np.isfinite(R).any()):
            why = a.consistency_note or dr.mem_note or "n/a: no memorized samples"
            _na_text(ax, why)
            reading.append(f"{dr.domain}: {why}")
            continue
        ax.plot(d.steps, S, "o-", label="S (consistency)")
        ax.plot(d.steps, R, "^-", label="R (raw mean cosine)")
        ax.legend(fontsize=7)
        ax2 = ax.twinx()
        ax2.plot(d.steps, _col(rows, "loss_mean"), "k--", lw=1)
        ax2.set_ylabel("mean probe loss (dashed)")
        n_na = int(np.nansum(_col(rows, "S_n_na")))
        reading.append(f"{dr.domain}: R {_change(R)}, S {_change(S)} ({n_na} sample-checkpoints with S n/a) while "
                       f"loss goes {_change(_col(rows, 'loss_mean'))}")
    return _save(plt, fig, path), "; ".join(reading) + "."


FIGURES = (
    ("memorized_vs_accuracy.png", "Memorized samples vs test accuracy", fig_memorized_vs_accuracy),
    ("lag.png", "Train@p → Test@q and the grokking lag", fig_lag),
    ("distance_vs_loss.png", "Pathway distance vs training loss per group", fig_distance_vs_loss),
    ("layerwise_distance.png", "Layer-wise pathway distance", fig_layerwise),
    ("consistency_vs_loss.png", "Consistency vs loss", fig_consistency),
)


def write_figures(a: Analysis, fig_dir: Path) -> dict[str, tuple[Path, str, str]]:
    return {name: (*fn(a, fig_dir / name), title) for name, title, fn in FIGURES}


# ----------------------------------------------------------------------------------------------------------------
# report.md

def _distance_table(a: Analysis) -> str:
    """First and last checkpoint of every group's distances, with the saturation diagnostics beside them. An n/a
    cell shows a footnote number; the reasons are listed under the table."""
    cols = ("n_samples", "path_text", "path_text_norm", "path_expert", "path_token", "kept_per_layer",
            "top1_weight", "entropy", "saturated", "loss_mean", "R_mean", "S_mean")
    lines = ["| domain | group | step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    first, last = a.data.steps[0], a.data.steps[-1]
    reasons: dict[str, int] = {}

    def cell(v) -> str:
        if isinstance(v, str) and v.startswith(("n/a", "not computed")):
            return f"n/a [{reasons.setdefault(v, len(reasons) + 1)}]"
        return "" if v == "" else _fmt(v)

    for r in a.rows:
        if r["group"] == "domain" or r["step"] not in (first, last):
            continue
        lines.append(f"| {r['domain']} | {r['group']} | {r['step']} | " + " | ".join(cell(r.get(c, "")) for c in cols)
                     + " |")
    lines += [""] + [f"[{k}] {why}  " for why, k in reasons.items()]
    return "\n".join(lines)


def report_markdown(a: Analysis, figs: Mapping[str, tuple[Path, str, str]], control_dir=None) -> str:
    d = a.data
    c = a.config
    out = [f"# moegrok analysis of `{d.run.path}`", ""]
    status = "finished" if d.run.finished else "**not finished (provisional)**"
    out.append(f"Run {status}; {len(d.steps)} checkpoints (steps {d.steps[0]}–{d.steps[-1]}); {d.num_layers} MoE "
               f"layer(s) × {d.num_experts} experts; domains: {', '.join(d.domains)}.")
    eps = f"fixed at {c.epsilon}" if c.epsilon is not None else "searched per domain (SPEC §2)"
    out.append(f"Settings: τ = {c.tau}, δ = {c.delta}, ε {eps}, "
               f"embedding for pairing: **{a.embedding}**, p-value correction: "
               f"{corr_mod.CORRECTION_NAMES[c.correction]}.")
    if a.notes:
        out += ["", "**Notes**", ""] + [f"- {n}" for n in a.notes]
    out += ["", "## Memorization (SPEC §2)", "",
            "| domain | samples | ε | memorized share | in 20–25% | memorized | groups | note |", "|---" * 8 + "|"]
    for dr in a.domains:
        e = dr.epsilon
        out.append(f"| {dr.domain} | {dr.sample_idx.size} | {_fmt(e.epsilon if e else NAN)} | "
                   f"{_fmt(e.share if e else NAN)} | {'' if e is None else ('yes' if e.in_target else 'no')} | "
                   f"{int((dr.t_star >= 0).sum())} | {len(np.unique(dr.t_star[dr.t_star >= 0]))} | "
                   f"{dr.mem_note or ''} |")
    out += ["", "## Generalization and grokking lag (SPEC §3)", "",
            "| domain | test items | generalized | Test groups | matched pairs | note |", "|---" * 6 + "|"]
    for dr in a.domains:
        n_items = 0 if dr.t_hash is None else dr.t_hash.size
        n_gen = 0 if dr.t_hash is None else int((dr.t_hash >= 0).sum())
        n_groups = 0 if dr.t_hash is None else len(np.unique(dr.t_hash[dr.t_hash >= 0]))
        out.append(f"| {dr.domain} | {n_items} | {n_gen} | {n_groups} | {len(dr.pairs)} | "
                   f"{dr.gen_note or dr.pair_note or ''} |")
    pairs = [p for dr in a.domains for p in dr.pairs]
    if pairs:
        out += ["", "| domain | Train@p | Test@q | lag (steps) | lag (checkpoints) | similarity | n train | n test |",
                "|---" * 8 + "|"]
        out += [f"| {p.domain} | {p.train_step} | {p.test_step} | {p.lag_steps} | {p.lag_checkpoints} | "
                f"{p.similarity:.3f} | {p.n_train} | {p.n_test} |" for p in pairs]
    for name in ("memorized_vs_accuracy.png", "lag.png"):
        out += _fig_md(figs, name)
    out += ["", "## Pathways (SPEC §4)", "",
            "Mean pairwise Levenshtein distance over memorized samples (text encoding; normalised; expert symbols; "
            "token-level), first and last checkpoint, with the saturation diagnostics next to it (experts kept per "
            "layer by the τ rule, top-expert weight, routing entropy). Full per-checkpoint values: `metrics.csv`, "
            "layer-wise: `layerwise.csv`.", "", _distance_table(a)]
    for name in ("distance_vs_loss.png", "layerwise_distance.png"):
        out += _fig_md(figs, name)
    out += ["", "## Consistency (SPEC §5)", "",
            a.consistency_note or "S, C and R defined for every memorized sample-checkpoint."]
    out += _fig_md(figs, "consistency_vs_loss.png")
    out += ["", "## Correlations with test accuracy (SPEC §6)", "",
            f"Sustained rise: the window starts at the last checkpoint up to the accuracy peak whose accuracy is at "
            f"most base + {c.rise_fraction} × (peak − base), base = the lowest accuracy before the peak; no window "
            f"if the rise is under {c.min_rise}."]
    out += [f"- {dm}: {w['rise_why']}" for dm, w in a.windows.items()]
    out += ["", correlation_markdown(a, control_dir)]
    out += ["## Files", "", "`metrics.csv` (checkpoint × domain × group), `layerwise.csv`, `samples.csv` (t* per "
            "probe sample), `test_items.csv` (t# per test item), `lag.csv`, `correlations.csv` / `.md`, "
            "`summary.json`, `figures/`."]
    return "\n".join(out) + "\n"


def _fig_md(figs, name: str) -> list[str]:
    if name not in figs:
        return []
    path, reading, title = figs[name]
    return ["", f"![{title}](figures/{name})", "", f"*{title}.* {reading}"]
