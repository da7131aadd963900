"""Lazy package exports: `import moegrok` (and `moegrok --help`) stay fast because JAX loads only when a name is used."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable, list[str]]:
    """(__getattr__, __dir__, __all__) for `package` whose public `name` lives in module `exports[name]`."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(list(namespace) + list(exports))

    return __getattr__, __dir__, sorted(exports)
