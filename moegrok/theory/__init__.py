"""Theory checks (METHOD §7): the routing kernel of an MoE with a frozen router, its effective dimension, the
complexity-reduced generalization bound, and numerical checks on synthetic data and on logged runs.

Public API (lazy, so importing the package does not load JAX)::

    routing_kernel(g [n, E], K [E, n, n]) -> H [n, n]
    effective_dimension(H [n, n], lam) -> float
    complexity_bound(H, y, lam, sigma2, delta=0.05, C1=1.0, C2=1.0) -> BoundTerms
"""
from __future__ import annotations

from moegrok._lazy import lazy_exports

_EXPORTS = {
    "routing_kernel": "moegrok.theory.kernel",
    "routing_cross_kernel": "moegrok.theory.kernel",
    "effective_dimension": "moegrok.theory.kernel",
    "feature_effective_dimension": "moegrok.theory.kernel",
    "kernel_spectrum": "moegrok.theory.kernel",
    "relative_lambda": "moegrok.theory.kernel",
    "bias_term": "moegrok.theory.kernel",
    "variance_term": "moegrok.theory.kernel",
    "confidence_term": "moegrok.theory.kernel",
    "complexity_bound": "moegrok.theory.kernel",
    "BoundTerms": "moegrok.theory.kernel",
    "Spectrum": "moegrok.theory.kernel",
    "TheoryError": "moegrok.theory.kernel",
    "kernel_ridge_fit": "moegrok.theory.kernel",
    "kernel_ridge_predict": "moegrok.theory.kernel",
    "empirical_ntk": "moegrok.theory.ntk",
    "SyntheticConfig": "moegrok.theory.synthetic",
    "run_synthetic": "moegrok.theory.synthetic",
    "RunTheoryConfig": "moegrok.theory.fromrun",
    "run_theory_rows": "moegrok.theory.fromrun",
    "run_theory": "moegrok.theory.run_report",
}


__getattr__, __dir__, __all__ = lazy_exports("moegrok.theory", _EXPORTS, globals())
