"""moegrok: memorization-to-generalization in mixture-of-experts language models (JAX / Flax NNX)."""
from __future__ import annotations

from moegrok._lazy import lazy_exports

__version__ = "0.1.0"

# Lazy (see moegrok._lazy): JAX loads only when a name is used.
_EXPORTS = {
    "RunDir": "moegrok.rundir",
    "MoegrokError": "moegrok.errors",
    "load_hf": "moegrok.convert.hf",
    "save_hf": "moegrok.convert.hf",
    "load_olmoe": "moegrok.convert.hf",
    "save_olmoe": "moegrok.convert.hf",
    "OlmoeConfig": "moegrok.model.config",
    "MoeConfig": "moegrok.model.config",
    "MoeLM": "moegrok.model.model",
}


__getattr__, __dir__, __all__ = lazy_exports("moegrok", _EXPORTS, globals())
