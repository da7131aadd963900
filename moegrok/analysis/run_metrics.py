"""Every metric of METHOD §2-§6 for one run directory, in memory: :func:`compute_analysis` -> :class:`Analysis`.

Writing it out (CSV, Markdown, JSON, report.md) is :mod:`moegrok.analysis.report`; the figures are
:mod:`moegrok.analysis.figures`.

Stages (each either yields numbers or an "n/a: reason" that ends up in the outputs, never a crash or a bare NaN):

1. load the per-checkpoint series through :class:`moegrok.rundir.RunDir` (losses, routing, router weights, eval);
2. memorization (ε search, t*, Train@t*) per domain; generalization (t#, Test@t#), pairing and grokking lag;
3. consistency S, C, R for all checkpoints in one batched call;
4. per checkpoint (progress bar): pathway metrics of every group, through :func:`_pathway_metrics` only;
5. per-domain series -> correlation rows (+ control run).

A metric-row cell is a number or an "n/a: reason" string; :func:`cell_number` and :func:`cell_text` read one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from moegrok.analysis import correlations as corr_mod
from moegrok.analysis import pathways as pw
from moegrok.analysis.consistency import consistency_caveat, consistency_undefined_reason, pathway_consistency
from moegrok.analysis.generalization import LagPair, embed_texts, generalized_since, pair_groups
from moegrok.analysis.memorization import EpsilonChoice, MemorizationConfig, memorized_since, select_epsilon
from moegrok.config_values import check_fields
from moegrok.errors import MoegrokError
from moegrok.rundir import RunDir

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    tau: float = 0.7  # METHOD §4 τ rule
    delta: float = 0.05  # METHOD §2
    epsilon: float | None = None  # fixed ε for every domain instead of the per-domain search
    embedding: str = "auto"  # "auto" | "minilm" | "tfidf"
    correction: str = "bh"  # "bh" | "holm"
    rise_fraction: float = corr_mod.RISE_FRACTION  # METHOD §6: the rise starts at this fraction of the total rise
    min_rise: float = corr_mod.MIN_RISE  # METHOD §6: a domain whose accuracy rises less has no rise window
    max_pair_samples: int = 4096  # METHOD §4 Decision: all pairs up to this many samples, then a fixed subsample
    seed: int = 0  # the fixed subsample of pairs (max_pair_samples) and the TF-IDF fallback
    token_position: int | None = None  # also report the pathway distance of this one token position
    token_align: str = "position"  # token-level pairs: "position" (templated data) or "prefix" (free text)
    progress: bool = True  # progress bars
    figures: bool = True  # write figures/
    # METHOD §2 uses the whole-sample loss. "answer": the loss over the tokens a document's rules determine (the
    # probe record's optional `answer_loss`), for synthetic documents whose other tokens are irreducible noise.
    memorization_loss: str = "sample"
    # In-run controls: domain -> a domain of the same run that memorizes without generalizing (a rule-free twin).
    # Its metric series, correlated with the domain's accuracy, fills the control columns when no control run is
    # given. None: pair every `<d>_twin` with `<d>` automatically; {} turns it off.
    control_domains: Mapping[str, str] | None = None

    def __post_init__(self):
        # One place for the rules: `moegrok analyze` flags and a config's `analysis:` section both land here.
        def bad(field, msg):
            raise MoegrokError(f"analysis.{field} {msg}")

        check_fields(self, "analysis")
        if self.memorization_loss not in ("sample", "answer"):
            bad("memorization_loss", f"must be 'sample' or 'answer', got {self.memorization_loss!r}")
        if not 0.0 < self.tau <= 1.0:
            bad("tau", f"must be in (0, 1], got {self.tau!r}")
        if not self.delta >= 0:
            bad("delta", f"must be >= 0, got {self.delta!r}")
        if self.epsilon is not None and not self.epsilon > 0:
            bad("epsilon", f"must be null or > 0, got {self.epsilon!r}")
        if self.max_pair_samples < 2:
            bad("max_pair_samples", f"must be an integer >= 2, got {self.max_pair_samples!r}")
        if self.embedding not in ("auto", "minilm", "tfidf"):
            bad("embedding", f"must be 'auto', 'minilm' or 'tfidf', got {self.embedding!r}")
        if self.correction not in ("bh", "holm"):
            bad("correction", f"must be 'bh' or 'holm', got {self.correction!r}")
        if self.token_align not in ("position", "prefix"):
            bad("token_align", f"must be 'position' or 'prefix', got {self.token_align!r}")


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


def load_run(path: str | os.PathLike, progress: bool = False, loss: str = "sample") -> RunData:
    """Every checkpoint's probe record and eval of a run. ``loss``: which per-sample loss fills ``loss_TxN``,
    ``"sample"`` (mean NLL over all tokens) or ``"answer"`` (the optional ``answer_loss`` field)."""
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
    loss_field = loss
    losses, route, router, evals = [], [], [], []
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
        if loss_field == "answer" and p.answer_loss is None:
            raise MoegrokError(f"{rd.path}/records/step_{s:09d}/probe.npz: no 'answer_loss' field, which "
                               "analysis.memorization_loss='answer' needs (only probe sets with marked answer "
                               "tokens have it); use memorization_loss='sample'")
        losses.append(p.answer_loss if loss_field == "answer" else p.sample_loss)
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
    return RunData(rd, steps, first.sample_ids, domain_N, domains, np.stack(losses).astype(np.float64),
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
    emb, embedding = None, "none (nothing to pair)"
    need = any((p[3] >= 0).any() and p[5] is not None and (p[5] >= 0).any() for p in pre)
    if need and data.probe_text is not None and data.test_text is not None:
        # One fit over every text so all domains share one vector space (matters for TF-IDF's vocabulary).
        texts = list(data.probe_text) + [t for d in data.domains for t in data.test_text.get(d, [])]
        emb, embedding = embed_texts(texts, cfg.embedding)
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


def _pathway_metrics(probe, groups: Mapping[Any, np.ndarray], cross: Mapping[Any, tuple[np.ndarray, np.ndarray]],
                     cfg: AnalysisConfig) -> tuple[dict[Any, dict[str, Any]], dict[Any, list[dict]]]:
    """THE one place that calls moegrok.analysis.pathways. For each group: mean pairwise distances and saturation
    diagnostics (PATHWAY_FIELDS; a str value is an "n/a: reason"); for each cross entry the mean distance between
    the two sample sets. Also, per group, one dict per layer (layer-wise distance and saturation)."""
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
                probe.topk_ids[idx], probe.token_mask[idx], E, align=cfg.token_align, **pairs).mean)
            if cfg.token_position is None:
                m["path_position"] = "n/a: no --token-position given"
            else:
                m["path_position"] = _guarded(lambda: pw.mean_pair_distance(pw.position_pathways(
                    probe.topk_ids[idx], probe.token_mask[idx], cfg.token_position, E), **pairs).mean)
        out[key], layers[key] = m, per_layer
    for key, (a, b) in cross.items():
        m = {f: "n/a: cross-domain pairs report the sample-level distance only" for f in PATHWAY_FIELDS}
        for enc in ("text", "expert"):
            d = pw.mean_cross_distance(pw.encode_pathways(probe.route_probs[a], cfg.tau, enc),
                                       pw.encode_pathways(probe.route_probs[b], cfg.tau, enc), **pairs)
            m[f"path_{enc}"], m[f"path_{enc}_norm"] = d.mean, d.mean_normalised
        out[key] = m
    return out, layers


def _guarded(fn) -> float | str:
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
    sample of the domain: loss and consistency only, METHOD §4 restricts pathways to memorized samples), "memorized"
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
               cons, cons_reason: str | None, pw_values: Mapping[str, Any] | None, probe=None) -> dict:
    d, g = key
    row: dict[str, Any] = {"step": step, "checkpoint": c, "domain": d, "group": g, "n_samples": int(idx.size)}
    extra = computed_metrics()
    if idx.size == 0:
        why = "n/a: no sample memorized before the last checkpoint"
        return row | {f: why for f in VALUE_FIELDS + tuple(m.column for m in extra)} | {"note": why}
    for m in extra:
        if other is not None:
            row[m.column] = "n/a: cross-domain rows hold pathway distances only"
        else:
            v = m.compute(GroupContext(data, c, step, d, g, idx, probe if probe is not None else data.run.probe(step)))
            row[m.column] = v if isinstance(v, str) else float(v)
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
        row.update({f: "not computed: pathways use memorized samples only (METHOD §4)" for f in PATHWAY_FIELDS})
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
        probe = data.run.probe(step)
        values, layer = (_pathway_metrics(probe, pw_groups, cross, cfg) if (pw_groups or cross) else ({}, {}))
        for key, (idx, other) in groups.items():
            rows.append(_group_row(c, step, key, idx, other, data, cons, cons_reason, values.get(key), probe))
            layer_rows += [{"step": step, "checkpoint": c, "domain": key[0], "group": key[1], "layer": l, **v}
                           for l, v in enumerate(layer.get(key, []))]
    return rows, layer_rows, cons


# ----------------------------------------------------------------------------------------------------------------
# 5. Series and correlations

@dataclasses.dataclass(frozen=True)
class Metric:
    """One per-checkpoint metric of `moegrok analyze`: declared once here, it becomes a column of metrics.csv (when
    it has its own column), a series correlated with test accuracy (correlations.csv, the report's tables and
    figures), and, with ``study=True``, a row of the multi-run study's table (`moegrok.analysis.multirun`).

    name: label in tables. group: the metrics.csv row group its series is read from ("memorized", "domain"), None for
    a per-domain series (validation loss). column: the metrics.csv column. direction: the expected sign of its
    correlation with test accuracy (METHOD §5; 0 = none expected). compute: for a metric added by a user,
    ``compute(GroupContext) -> float | "n/a: reason"`` evaluated for every (checkpoint, group) row; None for the
    built-in ones, which `checkpoint_metrics` computes together."""

    name: str
    group: str | None
    column: str
    direction: int = 0
    study: bool = False
    compute: Callable[["GroupContext"], Any] | None = None


@dataclasses.dataclass(frozen=True)
class GroupContext:
    """What a registered metric's `compute` gets: the checkpoint's probe record, the group's probe rows, the run."""

    data: "RunData"
    checkpoint: int
    step: int
    domain: str
    group: str
    idx: np.ndarray
    probe: Any


METRICS: list[Metric] = [  # the display order of Table 1
    Metric("pathway distance (text)", "memorized", "path_text", -1, study=True),
    Metric("pathway distance (text, normalised)", "memorized", "path_text_norm", -1),
    Metric("pathway distance (expert)", "memorized", "path_expert", -1, study=True),
    Metric("pathway distance (token)", "memorized", "path_token", -1, study=True),
    Metric("pathway distance (token position)", "memorized", "path_position", -1),  # only with --token-position
    Metric("consistency S", "memorized", "S_mean", +1, study=True),
    Metric("complexity C", "memorized", "C_mean", -1),
    Metric("raw consistency R", "memorized", "R_mean", 0, study=True),
    Metric("training loss (memorized)", "memorized", "loss_mean", 0, study=True),
    Metric("training loss (domain)", "domain", "loss_mean", 0, study=True),
    Metric("training loss MA3 (memorized)", "memorized", "loss_ma3"),
    Metric("validation loss", None, "val_loss", 0, study=True),
]


def register_metric(name: str, column: str, compute: Callable[[GroupContext], Any], *, group: str = "memorized",
                    direction: int = 0, study: bool = True) -> Metric:
    """Add a per-checkpoint metric (docs/extending.md): one entry here, one function. Returns it."""
    if any(m.name == name or m.column == column for m in METRICS):
        raise MoegrokError(f"analysis metric {name!r} / column {column!r} is already registered")
    m = Metric(name, group, column, direction, study, compute)
    METRICS.append(m)
    return m


def computed_metrics() -> list[Metric]:
    """Registered metrics with their own `compute` (columns of metrics.csv after the built-in ones)."""
    return [m for m in METRICS if m.compute is not None]


def cell_number(v) -> float:
    """A metric-row cell as a float: NaN for an n/a string, a bool or a missing cell."""
    return float(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) else NAN


def cell_text(v, spec: str = ".3g") -> str:
    """A metric-row cell for Markdown and figure titles: reasons as they are, bools yes/no, NaN as "n/a"."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    v = cell_number(v)
    return "n/a" if not math.isfinite(v) else format(v, spec)


def _metrics_for(cfg: AnalysisConfig) -> tuple:
    return tuple((m.name, m.group, m.column) for m in METRICS
                 if cfg.token_position is not None or m.column != "path_position")


def domain_series(data: RunData, rows: Sequence[dict], metrics: Sequence[tuple] | None = None):
    """domain -> metric name -> [T] (NaN where n/a at that checkpoint; correlate() drops and counts those), and
    domain -> metric name -> the n/a reason when the metric has no value at any checkpoint."""
    T = len(data.steps)
    metrics = metrics if metrics is not None else tuple((m.name, m.group, m.column) for m in METRICS)
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
                s[name] = np.array([cell_number(v) for v in cells])
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
        missing = (why or {}).get(d, {})
        metrics = {m: v for m, v in metrics.items() if m not in missing}
        for w in ("all", "rise"):
            start = windows[d].get(w)
            rows += [corr_mod.CorrRow(d, w, m, k, corr_mod.Corr(0, note=missing[m])) for m in missing
                     for k in corr_mod.KINDS]
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
    data = load_run(run_dir, cfg.progress, cfg.memorization_loss)
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
    else:
        pairs = in_run_controls(data.domains, cfg.control_domains)
        if pairs:
            twin_rows = correlation_rows(
                data.steps, {d: series[c] for d, c in pairs.items() if c in series},
                {d: data.accuracy[d] for d in pairs}, windows,
                {d: series_why.get(c, {}) for d, c in pairs.items()})
            crows = corr_mod.compare_with_control(
                crows, corr_mod.correct_rows(twin_rows, cfg.correction), only=set(pairs))
            notes.append("control columns: " + ", ".join(f"'{c}' for '{d}'" for d, c in pairs.items())
                         + " (in-run rule-free twin: its series against the domain's own accuracy)")
    return Analysis(data, cfg, doms, embedding, rows, layer_rows, cons_note, series, series_why, windows, crows,
                    notes)


def in_run_controls(domains: Sequence[str], mapping: Mapping[str, str] | None) -> dict[str, str]:
    """Domain -> its in-run control domain; see `AnalysisConfig.control_domains`."""
    if mapping is None:
        return {d: f"{d}_twin" for d in domains if f"{d}_twin" in domains}
    for d, c in mapping.items():
        for role, name in (("domain", d), ("control domain", c)):
            if name not in domains:
                raise MoegrokError(f"analysis.control_domains: {role} '{name}' is not in this run (domains: "
                                   f"{', '.join(domains)})")
    return dict(mapping)


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
