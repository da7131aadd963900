"""The run directory: the public contract between producers and consumers.

Producers (the trainer, the OLMoE trajectory pipeline) write run directories; consumers (analysis, theory, outside
tools) read them through :class:`RunDir` only. Layout::

    RUN_DIR/
      config.yaml              the resolved config the run was started with
      meta.json                RunMeta: {"format": "moegrok-run/1", "producer", "num_layers", "num_experts",
                                "top_k", "d_model", "domains", "total_steps", "finished": bool, ...}
      probes.jsonl             one line per probe sample, in record row order: {"id", "domain", "text"}
      tests.jsonl              one line per test item: {"id", "domain", "prompt", "answer"}
      metrics.jsonl            training scalars, one JSON object per logged step (trainer only), and at each
                               checkpoint {"step", "indicators": {name: {domain or "all": value}}}
      checkpoints/             orbax CheckpointManager directory: model, optimizer, data state (trainer only)
      records/step_000001000/  one directory per checkpoint, renamed into place when complete (atomic)
          probe.npz            the probe record, see PROBE_FIELDS
          eval.json            {"step", "val_loss": {domain: float},
                                "test": {domain: {"accuracy": float, "ids": [...], "correct": [0/1 ...]}},
                                "param_norms": {"all", "router", "experts", "attention"} (optional)}

A ``records/`` entry whose name does not start with ``step_`` (e.g. a ``.tmp-*`` directory left by a crash) is
ignored. Arrays are plain NumPy (``np.load`` reads them without pickle).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moegrok.errors import MoegrokError

FORMAT = "moegrok-run/1"
RECORDS = "records"
CHECKPOINTS = "checkpoints"

# name -> (dtype kind, shape in symbols). N probe samples, L MoE layers, E experts, d model width,
# T token positions, k experts per token.
PROBE_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sample_ids": ("i", ("N",)),
    "domains": ("U", ("N",)),
    "sample_loss": ("f", ("N",)),  # mean next-token NLL over the sample's tokens
    "route_probs": ("f", ("N", "L", "E")),  # routing distribution g (METHOD §4), mean over real tokens
    "router_weights": ("f", ("L", "E", "d")),  # row k = expert k's router vector
    "topk_ids": ("i", ("N", "T", "L", "k")),  # the experts the model chose, ordered by g (descending)
    "topk_weights": ("f", ("N", "T", "L", "k")),
    "token_mask": ("b", ("N", "T")),  # True on real (non-padding) tokens
    "tokens": ("i", ("N", "T")),
}
# Written when the probe set marks answer tokens (the synthetic corpora do; free text does not).
OPTIONAL_PROBE_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "answer_loss": ("f", ("N",)),  # mean next-token NLL over the sample's answer tokens, NaN if it has none
}


class RunDirError(MoegrokError, ValueError):
    """A run directory or one of its files is missing or malformed; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class ProbeRecord:
    step: int
    sample_ids: np.ndarray
    domains: np.ndarray
    sample_loss: np.ndarray
    route_probs: np.ndarray
    router_weights: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    token_mask: np.ndarray
    tokens: np.ndarray
    answer_loss: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return self.route_probs.shape[1]

    @property
    def num_experts(self) -> int:
        return self.route_probs.shape[2]


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    step: int
    val_loss: dict[str, float]
    accuracy: dict[str, float]
    test_ids: dict[str, list]
    correct: dict[str, np.ndarray]
    param_norms: dict[str, float] = dataclasses.field(default_factory=dict)  # optional: {"all", "router", ...}


def validate_probe_arrays(arrays: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """Check names, dtypes and mutually consistent shapes; returns NumPy arrays. `where` names the source in errors."""
    out: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for name, (kind, dims) in {**PROBE_FIELDS, **OPTIONAL_PROBE_FIELDS}.items():
        if name not in arrays and name in OPTIONAL_PROBE_FIELDS:
            continue
        if name not in arrays:
            raise RunDirError(f"{where}: missing probe field '{name}' (expected shape [{', '.join(dims)}])")
        a = np.asarray(arrays[name])
        ok_kind = {"i": "iu", "f": "f", "b": "b", "U": "US"}[kind]
        if a.dtype.kind not in ok_kind:
            raise RunDirError(f"{where}: probe field '{name}' has dtype {a.dtype}, expected kind '{kind}'")
        if a.ndim != len(dims):
            raise RunDirError(f"{where}: probe field '{name}' has shape {a.shape}, expected [{', '.join(dims)}]")
        for sym, n in zip(dims, a.shape):
            if sizes.setdefault(sym, n) != n:
                raise RunDirError(
                    f"{where}: probe field '{name}' has {sym}={n} but an earlier field has {sym}={sizes[sym]}")
        out[name] = a
    return out


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically: a temporary file beside it, then a rename. (The one helper for atomic files.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place; an existing target is swapped out first, then deleted."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Build a directory under a temporary name beside `target` (hidden, so readers never list it) and rename it
    into place when the block succeeds; on any error the temporary directory is removed and `target` is untouched.
    (The one helper for atomic directories: records, native and Hugging Face model directories.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = (target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}").absolute()
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def method_link(from_dir: str | os.PathLike) -> str:
    """A Markdown link to the method document for a report written in `from_dir` ("METHOD §N" cites its sections).

    The installed moegrok's METHOD.md is copied into the run directory (`from_dir`, or its parent when that is the
    run directory, as for RUN_DIR/analysis) and linked relatively, so the link resolves wherever the run directory
    is moved and however moegrok was installed, and it shows the method of the version that wrote the report."""
    from importlib import resources

    from moegrok import __version__

    here = Path(from_dir)
    home = next((d for d in (here, here.parent) if (d / "meta.json").is_file()), here)
    text = resources.files("moegrok.docs").joinpath("METHOD.md").read_text(encoding="utf-8")
    copy = home / "METHOD.md"
    if not copy.is_file() or copy.read_text(encoding="utf-8") != text:
        home.mkdir(parents=True, exist_ok=True)
        write_text(copy, text)
    return f"[METHOD.md]({Path(os.path.relpath(copy, here)).as_posix()}) (moegrok {__version__})"


def step_dirname(step: int) -> str:
    return f"step_{int(step):09d}"


def write_record(run_dir: str | os.PathLike, step: int, probe: Mapping[str, Any], eval_: Mapping[str, Any]) -> Path:
    """Write `records/step_X/` atomically: build it under a temporary name, then rename it into place."""
    arrays = validate_probe_arrays(probe, f"probe record for step {step}")
    final = Path(run_dir) / RECORDS / step_dirname(step)
    with atomic_dir(final) as tmp:  # rewriting a step after a resume swaps the old one out
        with open(tmp / "probe.npz", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "eval.json").write_text(json.dumps({"step": int(step), **eval_}, sort_keys=True))
    return final


@dataclasses.dataclass
class RunMeta:
    """meta.json, the same fields for every producer (``train``, ``trajectory``). `write_meta` refuses any other field,
    so producers cannot drift apart."""

    producer: str | None = None
    num_layers: int | None = None
    num_experts: int | None = None
    top_k: int | None = None
    d_model: int | None = None
    domains: list[str] = dataclasses.field(default_factory=list)
    total_steps: int | None = None  # the last step the run will reach (trainer: the epoch; olmoe: the last checkpoint)
    finished: bool = False
    data_fingerprint: str | None = None  # train: the corpus, so a resume refuses changed data
    corpus: dict | None = None  # train: the corpus summary (documents per domain, ...)
    parent: dict | None = None  # a fork: {"run_dir", "step"}
    checkpoints: list | None = None  # trajectory: [{"path", "step"}]
    model_type: str | None = None  # the model's family (Hugging Face model_type; "olmoe" for moegrok's own)
    router: str | None = None  # "softmax" or "sigmoid": how route_probs was normalised (METHOD §4)
    backend: str | None = None  # trajectory: "jax" or "torch", the forward that captured the routing
    format: str = FORMAT


META_FIELDS = tuple(f.name for f in dataclasses.fields(RunMeta))


def write_meta(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Create or update meta.json (atomically) with fields of :class:`RunMeta`."""
    unknown = sorted(set(fields) - set(META_FIELDS))
    if unknown:
        raise MoegrokError(f"meta.json: unknown field(s) {unknown}; RunMeta has {list(META_FIELDS)}")
    path = Path(run_dir) / "meta.json"
    meta = json.loads(path.read_text()) if path.exists() else {"format": FORMAT}
    meta.update(fields)
    _write_json(path, meta)


def write_jsonl(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunDirError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


class RunDir:
    """Read-only view of a run directory. Only complete (renamed-into-place) records are visible."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: not a directory (expected a moegrok run directory)")
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise RunDirError(f"{meta_path}: missing (is {self.path} a moegrok run directory?)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{meta_path}: not valid JSON ({e.msg})") from None
        if self.meta.get("format") != FORMAT:
            raise RunDirError(f"{meta_path}: field 'format' is {self.meta.get('format')!r}, expected {FORMAT!r}")

    @property
    def run_meta(self) -> RunMeta:
        """meta.json as a :class:`RunMeta` (fields a newer producer added are left out)."""
        return RunMeta(**{k: v for k, v in self.meta.items() if k in META_FIELDS})

    @property
    def config(self) -> dict:
        """The resolved config the run started with ({} for producers without one, e.g. `moegrok olmoe`)."""
        import yaml

        from moegrok.config_values import load_yaml

        p = self.path / "config.yaml"
        if not p.exists():
            return {}
        try:
            raw = load_yaml(p.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunDirError(f"{p}: unreadable ({e})") from None
        if not isinstance(raw, dict):
            raise RunDirError(f"{p}: expected a mapping with sections model / data / train")
        return raw

    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete orbax checkpoint (orbax's temporary directories are not integers: skipped)."""
        d = self.path / CHECKPOINTS
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "params").is_dir())

    def checkpoint_item(self, step: int, item: str = "params") -> Path:
        """The directory of one item (``params``, ``opt_state``, ``data``) of the checkpoint at `step`."""
        if step not in self.checkpoint_steps:
            raise RunDirError(f"{self.path / CHECKPOINTS}: no complete checkpoint at step {step}; available steps: "
                              f"{self.checkpoint_steps}")
        return self.path / CHECKPOINTS / str(step) / item

    @property
    def finished(self) -> bool:
        return bool(self.meta.get("finished", False))

    @property
    def steps(self) -> list[int]:
        d = self.path / RECORDS
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if p.name.startswith("step_") and (p / "probe.npz").exists() and (p / "eval.json").exists():
                out.append(int(p.name[5:]))
        return sorted(out)

    def _record_dir(self, step: int) -> Path:
        p = self.path / RECORDS / step_dirname(step)
        if not p.is_dir():
            raise RunDirError(f"{p}: no record for step {step}; available steps: {self.steps}")
        return p

    def probe(self, step: int) -> ProbeRecord:
        path = self._record_dir(step) / "probe.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile/ValueError on truncation: name the file
            raise RunDirError(f"{path}: unreadable probe record ({type(e).__name__}: {e})") from None
        arrays = validate_probe_arrays(arrays, str(path))
        return ProbeRecord(step=step, **arrays)

    def eval(self, step: int) -> EvalRecord:
        path = self._record_dir(step) / "eval.json"
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}: not valid JSON ({e.msg})") from None
        test = raw.get("test", {})
        return EvalRecord(
            step=step,
            val_loss={k: float(v) for k, v in raw.get("val_loss", {}).items()},
            accuracy={d: float(v["accuracy"]) for d, v in test.items()},
            test_ids={d: list(v["ids"]) for d, v in test.items()},
            correct={d: np.asarray(v["correct"], dtype=bool) for d, v in test.items()},
            param_norms={k: float(v) for k, v in raw.get("param_norms", {}).items()},
        )

    @property
    def probes(self) -> list[dict]:
        p = self.path / "probes.jsonl"
        return read_jsonl(p) if p.exists() else []

    @property
    def tests(self) -> list[dict]:
        p = self.path / "tests.jsonl"
        return read_jsonl(p) if p.exists() else []

    def _metrics_rows(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        return read_jsonl(p) if p.exists() else []

    def metrics(self) -> list[dict]:
        """Training scalars, one row per logged step."""
        return [r for r in self._metrics_rows() if "indicators" not in r]

    def live_indicators(self) -> dict[int, dict[str, dict[str, float]]]:
        """What the trainer logged at each checkpoint: ``{step: {indicator: {domain or "all": value}}}``."""
        return {int(r["step"]): r["indicators"] for r in self._metrics_rows() if "indicators" in r}

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, steps={self.steps})"
