"""Run NumPy/SciPy BLAS single-threaded inside a block (what threadpoolctl does, without the dependency).

On a shared 2-core machine OpenBLAS's own thread pool busy-waits against JAX's threads and other processes: a
200×200 ``eigh`` was measured at 0.3–0.5 s with its default threads and 3 ms with one. The theory CLI wraps its
work in :func:`single_threaded_blas`; JAX keeps its own thread pool. Where no OpenBLAS is found this is a no-op.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

_NAMES = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads")]


def _controls() -> list[tuple]:
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return []
    out = []
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for get, set_ in _NAMES:
            if hasattr(lib, get) and hasattr(lib, set_):
                out.append((getattr(lib, get), getattr(lib, set_)))
                break
    return out


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    ctl = _controls()
    before = [get() for get, _ in ctl]
    for _, set_ in ctl:
        set_(1)
    try:
        yield
    finally:
        for (_, set_), n in zip(ctl, before):
            set_(n)
