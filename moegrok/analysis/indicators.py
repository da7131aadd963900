"""Test-free indicators: every per-checkpoint signal a monitor could watch, declared once.

An :class:`Indicator` says how to compute one number per checkpoint (and per domain, for signals of the domain's
probe samples) from a :class:`Checkpoint` — the probe record, the evaluation record and the parameter norms of one
checkpoint — and which way it is expected to move when a domain generalizes. The trainer computes the registry at
every checkpoint while it trains (the live monitor: ``metrics.jsonl`` and TensorBoard), ``moegrok indicators``
computes it afterwards from the run directory with the same functions (:func:`run_indicators`), and the benchmark
(:mod:`moegrok.analysis.benchmark`) judges every entry the same way. Adding an indicator is one :func:`register`
call with one function.

Signals of a domain use its probe samples only (training documents, so nothing here looks at a test item); the
parameter norms and the router's effective rank are properties of the whole model ("global").
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

GLOBAL = "all"  # the domain key of a whole-model indicator


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What one checkpoint offers to an indicator. ``probe`` has the fields of a probe record (``domains``,
    ``route_probs``, ...; a :class:`moegrok.rundir.ProbeRecord` or any object with those attributes)."""

    step: int
    probe: object
    val_loss: Mapping[str, float]
    param_norms: Mapping[str, float]

    def rows(self, domain: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.probe.domains).astype(str) == domain)


@dataclasses.dataclass(frozen=True)
class Indicator:
    name: str  # column name in CSV files and in metrics.jsonl
    label: str  # human label for tables and figures
    group: str  # "paper" (the paper's two), "loss", "norm", "routing"
    direction: int  # expected sign of its change as the domain generalizes (+1 rises, -1 falls)
    per_domain: bool  # True: one value per domain (its probe samples); False: one value for the model
    fn: Callable[[Checkpoint, str], float]  # (checkpoint, domain) -> value; domain is GLOBAL when not per_domain
    doc: str = ""


REGISTRY: dict[str, Indicator] = {}


def register(name: str, label: str, group: str, direction: int, per_domain: bool, doc: str = ""):
    """Decorator: add ``fn(checkpoint, domain) -> float`` to the registry under ``name``."""
    if direction not in (-1, 1):
        raise ValueError(f"indicator {name!r}: direction must be +1 or -1, got {direction!r}")

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"indicator {name!r} is registered twice")
        REGISTRY[name] = Indicator(name, label, group, direction, per_domain, fn, doc or (fn.__doc__ or "").strip())
        return fn

    return deco


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


# ------------------------------------------------------------------------------------------------ the paper's two
def _pathway(encoding: str):
    def fn(ck: Checkpoint, d: str) -> float:
        from moegrok.analysis.pathways import pathway_distance

        rows = ck.rows(d)
        if len(rows) < 2:
            return float("nan")
        return pathway_distance(np.asarray(ck.probe.route_probs)[rows], encoding=encoding).mean

    return fn


register("path_text", "pathway distance (text)", "paper", -1, True,
         "mean character Levenshtein distance between the tau-rule pathway strings of the domain's probe samples "
         "(all pairs)")(_pathway("text"))
register("path_expert", "pathway distance (expert)", "paper", -1, True,
         "the same on expert-id symbols")(_pathway("expert"))


@register("path_token", "pathway distance (token)", "paper", -1, True)
def _path_token(ck: Checkpoint, d: str) -> float:
    """mean over probe-sample pairs of the token-pathway (top-k experts per layer) distance at aligned positions"""
    from moegrok.analysis.pathways import token_pathway_distance

    rows = ck.rows(d)
    if len(rows) < 2:
        return float("nan")
    p = ck.probe
    return token_pathway_distance(np.asarray(p.topk_ids)[rows], np.asarray(p.token_mask)[rows],
                                  np.asarray(p.route_probs).shape[-1]).mean


def _consistency(ck: Checkpoint, d: str):
    from moegrok.analysis.consistency import pathway_consistency

    rows = ck.rows(d)
    g = np.asarray(ck.probe.route_probs)[rows]
    if not len(rows) or g.shape[1] < 2:
        return None
    return pathway_consistency(g, np.asarray(ck.probe.router_weights))


@register("consistency_S", "consistency S", "paper", 1, True)
def _consistency_s(ck: Checkpoint, d: str) -> float:
    """mean pathway consistency S of the domain's probe samples (samples where S is undefined left out)"""
    c = _consistency(ck, d)
    if c is None or not c.s_defined_BxN.any():
        return float("nan")
    return float(np.nanmean(c.S_BxN))


@register("consistency_R", "raw consistency R", "paper", 1, True)
def _consistency_r(ck: Checkpoint, d: str) -> float:
    """mean adjacent-layer cosine of the routing embeddings (always defined)"""
    c = _consistency(ck, d)
    return float("nan") if c is None else float(np.mean(c.R_BxN))


# ------------------------------------------------------------------------------------------------ losses
@register("train_loss", "training loss (probes)", "loss", -1, True)
def _train_loss(ck: Checkpoint, d: str) -> float:
    """mean next-token loss of the domain's probe samples (training documents)"""
    rows = ck.rows(d)
    return float(np.mean(np.asarray(ck.probe.sample_loss)[rows])) if len(rows) else float("nan")


@register("train_answer_loss", "training answer loss (probes)", "loss", -1, True)
def _train_answer_loss(ck: Checkpoint, d: str) -> float:
    """median answer-token loss of the domain's probe samples (NaN without marked answers)"""
    al = getattr(ck.probe, "answer_loss", None)
    rows = ck.rows(d)
    if al is None or not len(rows):
        return float("nan")
    v = np.asarray(al)[rows]
    v = v[~np.isnan(v)]
    return float(np.median(v)) if len(v) else float("nan")


@register("val_loss", "validation loss", "loss", -1, True)
def _val_loss(ck: Checkpoint, d: str) -> float:
    """mean next-token loss on the domain's validation documents (same distribution, never trained on)"""
    return float(ck.val_loss.get(d, float("nan")))


# ------------------------------------------------------------------------------------------------ norms
NORM_PARTS = ("all", "router", "experts", "attention")


def _norm(part: str):
    def fn(ck: Checkpoint, d: str) -> float:
        return float(ck.param_norms.get(part, float("nan")))

    return fn


for _part in NORM_PARTS:
    register(f"norm_{_part}", f"parameter L2 norm ({_part})", "norm", -1, False,
             f"L2 norm of the {_part} parameters" if _part != "all" else "L2 norm of every parameter")(_norm(_part))


def param_norms(params: Mapping) -> dict[str, float]:
    """L2 norms of a model's parameters: all, the routers, the experts, the attention projections. ``params`` is
    the nested dict of :func:`moegrok.model.model.get_params` (names as in the model's modules)."""
    sq = dict.fromkeys(NORM_PARTS, 0.0)

    def walk(node, path):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, path + (str(k),))
            return
        s = float(np.sum(np.square(np.asarray(node, dtype=np.float64))))
        sq["all"] += s
        leaf = path[-1]
        if "moe" in path and leaf == "router":
            sq["router"] += s
        elif "moe" in path and leaf in ("gate_up", "down"):
            sq["experts"] += s
        elif "attn" in path:
            sq["attention"] += s

    walk(params, ())
    return {k: float(np.sqrt(v)) for k, v in sq.items()}


# ------------------------------------------------------------------------------------------------ routing
def _route_rows(ck: Checkpoint, d: str) -> np.ndarray:
    return np.asarray(ck.probe.route_probs, dtype=np.float64)[ck.rows(d)]


@register("route_entropy", "routing entropy", "routing", -1, True)
def _route_entropy(ck: Checkpoint, d: str) -> float:
    """entropy (nats) of each probe sample's mean router softmax, averaged over samples and layers"""
    p = _route_rows(ck, d)
    if not len(p):
        return float("nan")
    return float(-(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1).mean())


@register("route_top1", "top-1 routing weight", "routing", 1, True)
def _route_top1(ck: Checkpoint, d: str) -> float:
    """largest weight of each probe sample's mean router softmax, averaged over samples and layers"""
    p = _route_rows(ck, d)
    return float(p.max(-1).mean()) if len(p) else float("nan")


def effective_rank(m: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007)."""
    s = np.linalg.svd(np.asarray(m, dtype=np.float64), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    q = s / s.sum()
    q = q[q > 0]
    return float(np.exp(-(q * np.log(q)).sum()))


@register("router_erank", "router effective rank", "routing", -1, False)
def _router_erank(ck: Checkpoint, d: str) -> float:
    """effective rank of each layer's router weight matrix [E, d], averaged over layers"""
    w = np.asarray(ck.probe.router_weights)
    return float(np.mean([effective_rank(w[l]) for l in range(w.shape[0])]))


# ------------------------------------------------------------------------------------------------ evaluation
def compute(ck: Checkpoint, domains, names=None) -> dict[str, dict[str, float]]:
    """``{indicator: {domain or GLOBAL: value}}`` for one checkpoint."""
    out: dict[str, dict[str, float]] = {}
    for name in names or list(REGISTRY):
        ind = REGISTRY[name]
        keys = list(domains) if ind.per_domain else [GLOBAL]
        out[name] = {k: float(ind.fn(ck, k)) for k in keys}
    return out


def checkpoint_of(run, step: int) -> Checkpoint:
    """The :class:`Checkpoint` of a run directory's record at ``step``."""
    ev = run.eval(step)
    return Checkpoint(step=step, probe=run.probe(step), val_loss=ev.val_loss, param_norms=ev.param_norms)


def run_indicators(run, names=None, progress: bool = False) -> tuple[list[int], dict[str, dict[str, np.ndarray]]]:
    """Every registered indicator at every checkpoint of a run: ``(steps, {indicator: {domain: [T] values}})``."""
    from tqdm.auto import tqdm

    from moegrok.rundir import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    steps = run.steps
    domains = list(run.meta.get("domains", []))
    names = list(names or REGISTRY)
    per_step = [compute(checkpoint_of(run, s), domains, names)
                for s in tqdm(steps, desc=f"indicators {run.path.name}", disable=not progress, leave=False)]
    series = {n: {k: np.array([row[n][k] for row in per_step]) for k in (per_step[0][n] if per_step else {})}
              for n in names}
    return steps, series


def series_for(series: Mapping[str, Mapping[str, np.ndarray]], name: str, domain: str) -> np.ndarray:
    """One indicator's values for a domain (a global indicator's values for every domain)."""
    s = series[name]
    return s[domain] if REGISTRY[name].per_domain else s[GLOBAL]
