"""moegrok: memorization-to-generalization in mixture-of-experts language models (JAX / Flax NNX)."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Lazy exports keep `import moegrok` (and `moegrok --help`) fast: JAX loads only when a name is used.
_EXPORTS = {
    "RunDir": "moegrok.rundir",
    "MoegrokError": "moegrok.errors",
    "load_olmoe": "moegrok.convert.hf",
    "save_olmoe": "moegrok.convert.hf",
    "OlmoeConfig": "moegrok.model.config",
    "MoeConfig": "moegrok.model.config",
    "MoeLM": "moegrok.model.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moegrok' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
