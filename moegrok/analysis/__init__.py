"""Analysis of run directories (METHOD §2-§6): memorization, generalization and grokking lag, pathway distance and
consistency, their correlation with test accuracy, and the `moegrok analyze` report.

Modules: ``memorization`` (ε search, t*), ``generalization`` (t#, embeddings, Hungarian pairing, lag),
``consistency`` (S, C, R; JAX), ``pathways`` / ``levenshtein`` (METHOD §4), ``correlations`` (Table 1 and the
controls beyond it), ``run_metrics`` (the whole pipeline in memory: load a run, per-checkpoint metric rows,
correlation rows), ``figures`` (matplotlib), ``report`` (CSV/Markdown/JSON/report.md and `analyze`), ``cli``
(`moegrok analyze`).
Names below load lazily so importing this package does not import JAX.
"""
from __future__ import annotations

from moegrok._lazy import lazy_exports

_EXPORTS = {
    "AnalysisConfig": "moegrok.analysis.run_metrics",
    "analyze": "moegrok.analysis.report",
    "compute_analysis": "moegrok.analysis.run_metrics",
    "register_metric": "moegrok.analysis.run_metrics",
    "memorized_since": "moegrok.analysis.memorization",
    "select_epsilon": "moegrok.analysis.memorization",
    "generalized_since": "moegrok.analysis.generalization",
    "match_groups": "moegrok.analysis.generalization",
    "pathway_consistency": "moegrok.analysis.consistency",
    "correlate": "moegrok.analysis.correlations",
    "levenshtein_matrix": "moegrok.analysis.levenshtein",
    "levenshtein_pairs": "moegrok.analysis.levenshtein",
    "run_transitions": "moegrok.analysis.transition",
    "run_indicators": "moegrok.analysis.indicators",
    "run_benchmark": "moegrok.analysis.benchmark",
    "partial_correlation": "moegrok.analysis.correlations",
}


__getattr__, __dir__, __all__ = lazy_exports("moegrok.analysis", _EXPORTS, globals())
