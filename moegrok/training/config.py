"""Run config: YAML with sections `model` (MoeConfig), `data` (DataConfig) and `train` (TrainConfig), plus
`key.sub=value` overrides from the command line."""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from moegrok.config_values import check_fields, load_yaml
from moegrok.errors import MoegrokError

SCHEDULES = ("constant", "cosine", "linear")


def request_host_devices(n: int) -> None:
    """Make a CPU process expose `n` XLA devices (`--xla_force_host_platform_device_count`), so a mesh of `n`
    devices also runs on one multi-core CPU: data parallel over the cores, which on small models is faster than
    one device (see `make_train_step`). Only takes effect before JAX initialises its backend; an explicit count in
    XLA_FLAGS wins. Accelerator platforms are unaffected."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags and not _jax_started():
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _jax_started() -> bool:
    """Whether this process's JAX backends exist already (then the flag would change nothing here and only leak
    into child processes)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume started, never leak
        return True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # model initialisation (the data's order is data.seed's)
    learning_rate: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up from 0
    schedule: str = "constant"  # after warm-up: constant, cosine or linear decay to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.1  # cosine / linear decay ends at this fraction of learning_rate
    weight_decay: float = 1.0  # decoupled (AdamW), matrices only; 0.1 memorizes, never generalizes (docs/findings.md)
    b1: float = 0.9  # AdamW beta 1
    b2: float = 0.98  # AdamW beta 2
    eps: float = 1e-8  # AdamW epsilon
    clip_norm: float = 1.0  # global gradient-norm clip (0: off)
    num_checkpoints: int = 10  # evenly spaced over the epoch, the last at the final step (the paper uses 10)
    checkpoint_every: int | None = None  # if set, overrides num_checkpoints
    max_steps: int | None = None  # stop early (the epoch is cut, never repeated)
    log_every: int = 10  # steps between training-scalar rows in metrics.jsonl
    eval_batch_size: int = 128  # rows per batch of the probe, validation and test evaluations
    mesh_data: int = 1  # devices along the data axis
    mesh_expert: int = 1  # devices along the expert axis
    tensorboard: bool = True  # also write the scalars to RUN_DIR/tb
    @property
    def mesh_devices(self) -> int:
        return self.mesh_data * self.mesh_expert

    def __post_init__(self):
        def bad(field, msg):
            raise MoegrokError(f"train config: field '{field}' {msg}")

        check_fields(self, "train")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate!r}")
        for f in ("weight_decay", "clip_norm", "min_lr_ratio"):
            if not getattr(self, f) >= 0:
                bad(f, f"must be >= 0, got {getattr(self, f)!r}")
        for f in ("num_checkpoints", "log_every", "eval_batch_size", "mesh_data", "mesh_expert"):
            if getattr(self, f) < 1:
                bad(f, f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("checkpoint_every", "max_steps"):
            v = getattr(self, f)
            if v is not None and v < 1:
                bad(f, f"must be null or a positive integer, got {v!r}")
        if self.warmup_steps < 0:
            bad("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")


def dataclass_from_dict(cls, d: Mapping[str, Any] | None, section: str):
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise MoegrokError(f"config section '{section}': unknown field(s) {unknown}; allowed: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise MoegrokError(f"config section '{section}': {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`train.learning_rate=3e-4` sets raw['train']['learning_rate'] (the value is read as in a config file)."""
    out = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise MoegrokError(f"override {ov!r}: expected key.sub=value")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MoegrokError(f"override {ov!r}: '{p}' is not a section")
        try:
            node[parts[-1]] = load_yaml(val)
        except yaml.YAMLError:
            raise MoegrokError(f"override {ov!r}: the value is not valid YAML") from None
    return out


def packaged_configs() -> dict[str, Any]:
    """The configs that ship with moegrok (the repository's configs/, package data), by name."""
    from importlib import resources

    return {p.name[:-len(".yaml")]: p for p in resources.files("moegrok.configs").iterdir()
            if p.name.endswith(".yaml")}


def resolve_config(path: str | Path) -> Any:
    """The config file `path` names: a file as given, or, for a bare name (no '/', no '.yaml') that is not a file,
    the packaged config of that name, so `moegrok run tiny` works from any directory and from a wheel."""
    given = str(path)
    if Path(given).exists() or "/" in given or os.sep in given or given.endswith(".yaml"):
        return Path(given)
    shipped = packaged_configs()
    if given not in shipped:
        raise MoegrokError(f"{given}: neither a config file nor a packaged config; packaged: "
                           f"{', '.join(sorted(shipped))} (or give a path to a .yaml file)")
    return shipped[given]


def load_config_file(path: str | Path, overrides: list[str] = ()) -> dict:
    path = resolve_config(path)
    if not path.exists():
        raise MoegrokError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MoegrokError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise MoegrokError(f"{path}: expected a mapping with sections model/data/train")
    allowed = {"model", "data", "train", "analysis", "theory"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise MoegrokError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(allowed)}")
    return apply_overrides(raw, list(overrides))
