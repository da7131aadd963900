"""Which platform the model is being traced for: the running backend, or the one `moegrok plan` lowers for from this
host. The expert and attention paths (`moe.expert_impl_for`, `layers.attention_impl_for`) are picked by it."""
from __future__ import annotations

import contextlib

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_TARGET: str | None = None


def current() -> str:
    """`cpu` | `cuda` | `rocm` | `tpu` for the computation being traced now."""
    if _TARGET is not None:
        return _TARGET
    import jax

    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(getattr(jax.devices()[0], "client", None), "platform_version", ""))
        return "rocm" if "rocm" in version.lower() else "cuda"
    return backend


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace for `platform` instead of the running backend (ahead-of-time lowering)."""
    global _TARGET
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    before, _TARGET = _TARGET, platform
    try:
        yield
    finally:
        _TARGET = before
