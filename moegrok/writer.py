"""`RunWriter`: the producer side of the run-directory contract (`moegrok.rundir` documents the layout; `RunDir` is
the one reader). moegrok's trainer, `moegrok trajectory`, the Hugging Face Trainer callback and plain PyTorch loops
all write through it, so there is one place that writes the format.

Importing this module and writing records needs NumPy only (no JAX, no torch): it runs inside any training process.

One writer per run directory: the writer holds an exclusive lock on ``RUN_DIR/.moegrok.lock`` (``flock``) for its
lifetime. A second writer — in this process's other objects, another process on this host, or another host sharing
the file system (NFSv4 and Lustre pass ``flock`` to the server) — is refused with the holder's host, pid and start
time. The kernel drops the lock when its process dies, however it dies, so a lock left by a killed run is taken
over by the next writer with nothing to clean up (the holder line left in the file is just overwritten).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from moegrok import rundir
from moegrok.errors import MoegrokError

LOCK = ".moegrok.lock"
ROUTERS = ("softmax", "sigmoid")
KIND_NAMES = {"iu": "integers", "f": "floats", "biu": "booleans"}
PRODUCER_ALIASES = {"olmoe": "trajectory"}  # what `moegrok trajectory` was called before it took every family


class RunLockedError(MoegrokError):
    """Another writer holds the run directory."""


# --------------------------------------------------------------------------------------------------------- lock
_HELD: dict[str, list] = {}  # realpath -> [open lock file, holders in this process]


def _locked(run_dir, holder: str) -> RunLockedError:
    return RunLockedError(f"{run_dir}: already being written by {holder or 'another process'} "
                          f"({Path(run_dir) / LOCK}); wait for it to finish, stop it, or use another run directory")


def acquire_lock(run_dir: str | os.PathLike) -> str:
    """Take the run directory's writer lock (re-entrant within this process); returns the key for `release_lock`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise _locked(run_dir, holder) from None
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n")
    f.flush()
    _HELD[key] = [f, 1]
    return key


def check_unlocked(run_dir: str | os.PathLike) -> None:
    """Refuse early (before any heavy start-up) when another writer holds `run_dir`; creates nothing. The lock
    itself is taken later by `acquire_lock`."""
    path = Path(run_dir) / LOCK
    if os.path.realpath(Path(run_dir)) in _HELD or not path.is_file():
        return
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise _locked(run_dir, f.read().strip()) from None


def release_lock(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        fcntl.flock(held[0].fileno(), fcntl.LOCK_UN)
        held[0].close()


# ------------------------------------------------------------------------------------------------------ records
def routing_distribution(router_logits: np.ndarray, router: str) -> np.ndarray:
    """METHOD §4's g from raw router scores (last axis = experts): softmax, or sigmoid scores normalised to sum 1."""
    x = np.asarray(router_logits, np.float64)
    if router == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-x))
        return (s / s.sum(-1, keepdims=True)).astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _field(name: str, a: Any, kind: str, ndim: int, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in kind:
        raise MoegrokError(f"{where}: field '{name}' has dtype {a.dtype}, expected {KIND_NAMES[kind]}")
    if a.ndim != ndim:
        raise MoegrokError(f"{where}: field '{name}' has {a.ndim} dimensions {a.shape}, expected {ndim}")
    return a


def probe_arrays(*, tokens: np.ndarray, token_mask: np.ndarray, sample_loss: np.ndarray, topk_ids: np.ndarray,
                 router_weights: np.ndarray, sample_ids: Sequence[int], domains: Sequence[str],
                 route_probs: np.ndarray | None = None, router_logits: np.ndarray | None = None,
                 router: str | None = None, topk_weights: np.ndarray | None = None,
                 answer_loss: np.ndarray | None = None, where: str = "probe record") -> dict[str, np.ndarray]:
    """A probe record from what any framework can produce, checked field by field.

    tokens, token_mask [N, T]; sample_loss [N]; topk_ids [N, T, L, k] (the experts the model used); router_weights
    [L, E, d]. The routing either as ``route_probs`` [N, L, E] (g already averaged over real tokens) or as raw
    ``router_logits`` [N, T, L, E] with ``router`` ("softmax" | "sigmoid"), from which g, route_probs and the
    top-k weights are computed as METHOD §4 defines them. ``topk_weights`` defaults to g at ``topk_ids``.
    """
    tokens = _field("tokens", tokens, "iu", 2, where)
    mask = _field("token_mask", token_mask, "biu", 2, where).astype(bool)
    N, T = tokens.shape
    if mask.shape != (N, T):
        raise MoegrokError(f"{where}: field 'token_mask' has shape {mask.shape}, tokens {tokens.shape}")
    ids = _field("topk_ids", topk_ids, "iu", 4, where)
    if ids.shape[:2] != (N, T):
        raise MoegrokError(f"{where}: field 'topk_ids' has shape {ids.shape}, expected [N={N}, T={T}, L, k]")
    W = _field("router_weights", router_weights, "f", 3, where)
    L, E = W.shape[:2]
    if ids.shape[2] != L:
        raise MoegrokError(f"{where}: field 'topk_ids' has L={ids.shape[2]} layers, router_weights L={L}")
    if ids.size and (ids.min() < 0 or ids.max() >= E):
        raise MoegrokError(f"{where}: field 'topk_ids' has expert ids {ids.min()}..{ids.max()}, outside [0, {E})")
    if (route_probs is None) == (router_logits is None):
        raise MoegrokError(f"{where}: give exactly one of 'route_probs' [N, L, E] or 'router_logits' [N, T, L, E]")
    if router_logits is not None:
        if router not in ROUTERS:
            raise MoegrokError(f"{where}: field 'router' must be one of {ROUTERS} with router_logits, got {router!r}")
        logits = _field("router_logits", router_logits, "f", 4, where)
        if logits.shape != (N, T, L, E):
            raise MoegrokError(f"{where}: field 'router_logits' has shape {logits.shape}, expected {(N, T, L, E)}")
        g = routing_distribution(logits, router)
        m = mask.astype(np.float32)[:, :, None, None]
        route_probs = (g * m).sum(1) / np.maximum(m.sum(1), 1.0)
        if topk_weights is None:
            topk_weights = np.take_along_axis(g, ids.astype(np.int64), axis=-1)
    rp = _field("route_probs", route_probs, "f", 3, where)
    if rp.shape != (N, L, E):
        raise MoegrokError(f"{where}: field 'route_probs' has shape {rp.shape}, expected {(N, L, E)}")
    if topk_weights is None:
        raise MoegrokError(f"{where}: field 'topk_weights' is needed with route_probs (or pass router_logits)")
    tw = _field("topk_weights", topk_weights, "f", 4, where)
    if tw.shape != ids.shape:
        raise MoegrokError(f"{where}: field 'topk_weights' has shape {tw.shape}, topk_ids {ids.shape}")
    loss = _field("sample_loss", sample_loss, "f", 1, where)
    if len(loss) != N or len(sample_ids) != N or len(domains) != N:
        raise MoegrokError(f"{where}: {N} token rows but sample_loss {len(loss)}, sample_ids {len(sample_ids)}, "
                           f"domains {len(domains)}; one of each per row")
    real = mask[:, :, None, None]
    out = dict(tokens=tokens.astype(np.int32), token_mask=mask, sample_loss=loss.astype(np.float32),
               route_probs=rp.astype(np.float32), router_weights=W.astype(np.float32),
               topk_ids=np.where(real, ids, 0).astype(np.int32),
               topk_weights=np.where(real, tw, 0.0).astype(np.float32),
               sample_ids=np.asarray(sample_ids, np.int64), domains=np.asarray(list(domains), dtype=str))
    if answer_loss is not None:
        al = _field("answer_loss", answer_loss, "f", 1, where)
        if len(al) != N:
            raise MoegrokError(f"{where}: field 'answer_loss' has {len(al)} rows, expected {N}")
        out["answer_loss"] = al.astype(np.float32)
    return out


def check_rows(tokens_NxT, mask_NxT, where: str, vocab_size: int, error=MoegrokError, right_padded: bool = False,
               **extra) -> tuple[np.ndarray, ...]:
    """Token rows a forward can use: (tokens int32, mask bool, *extra bool masks), 2-D, one shape, ids inside the
    vocabulary (an id outside it would silently gather garbage embeddings); `right_padded`: mask True then False.
    Raises `error` naming `where` and the argument."""
    tokens = np.asarray(tokens_NxT)
    if tokens.ndim != 2 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise error(f"{where}: tokens must be a 2-D integer array [N, T], got shape {tokens.shape} "
                    f"dtype {tokens.dtype}")
    mask = np.asarray(mask_NxT, bool)
    out = [tokens.astype(np.int32), mask]
    for name, m in (("mask", mask), *extra.items()):
        m = np.asarray(m, bool)
        if m.shape != tokens.shape:
            raise error(f"{where}: {name} has shape {m.shape}, tokens {tokens.shape}; they must match")
        if name != "mask":
            out.append(m)
    if right_padded and mask.size and (np.diff(mask.astype(np.int8), axis=1) > 0).any():
        bad = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) > 0).any(axis=1))
        raise error(f"{where}: rows {bad[:5].tolist()} are not right-padded (mask must be True then False)")
    real = tokens[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise error(f"{where}: token ids must be in [0, {vocab_size}) (the model's vocabulary); got "
                    f"{int(real.min())}..{int(real.max())}")
    return tuple(out)


def correctness(ids_by_domain: Mapping[str, Sequence], correct_by_domain: Mapping[str, Sequence]) -> dict:
    """eval.json's "test" entry from per-item correctness: {domain: {"accuracy", "ids", "correct"}}."""
    out = {}
    for d, ids in ids_by_domain.items():
        c = [int(bool(x)) for x in correct_by_domain[d]]
        if len(c) != len(ids):
            raise MoegrokError(f"test correctness of domain {d!r}: {len(ids)} ids but {len(c)} values")
        out[d] = {"accuracy": float(np.mean(c)) if c else float("nan"), "ids": list(ids), "correct": c}
    return out


# ------------------------------------------------------------------------------------------------------ writer
def check_probes(run_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a run directory whose probes.jsonl holds another probe set: its records would not be comparable."""
    path = Path(run_dir) / "probes.jsonl"
    if path.exists() and rundir.read_jsonl(path) != [dict(r) for r in rows]:
        raise MoegrokError(f"{path}: holds another probe set than this run's: another run's directory; "
                           "use a new one")


class RunWriter:
    """Create or resume one run directory and write it; holds the directory's writer lock until `close`.

    ``RunWriter(run_dir, producer=..., meta={...}, probes=[...], tests=[...])``: meta fields are RunMeta's
    (num_layers, num_experts, top_k, d_model, domains, total_steps, model_type, router, ...). On an existing run
    directory the probes (and the producer) must be the same — otherwise it is another run's directory and is
    refused naming the file — and `steps` lists the records already written.
    """

    def __init__(self, run_dir: str | os.PathLike, *, producer: str, meta: Mapping[str, Any] | None = None,
                 probes: Sequence[Mapping[str, Any]] | None = None, tests: Sequence[Mapping[str, Any]] = ()):
        self.path = Path(run_dir)
        self._lock = acquire_lock(self.path)
        try:
            self._start(producer, dict(meta or {}), probes, list(tests))
        except BaseException:
            release_lock(self._lock)
            raise
        self._written: set[int] = set()

    def _start(self, producer: str, meta: dict, probes, tests) -> None:
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            try:
                before = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise MoegrokError(f"{meta_path}: unreadable ({e}); not a run directory this writer can resume") \
                    from None
            if PRODUCER_ALIASES.get(before.get("producer"), before.get("producer")) not in (None, producer):
                raise MoegrokError(f"{meta_path}: written by producer {before.get('producer')!r}, this writer is "
                                   f"{producer!r}: another run's directory; use a new one")
            for key in ("num_layers", "num_experts", "top_k", "d_model", "model_type"):
                if key in meta and before.get(key) not in (None, meta[key]):
                    raise MoegrokError(f"{meta_path}: field '{key}' is {before[key]!r}, this run has {meta[key]!r}: "
                                       "another run's directory; use a new one")
        if probes is not None:
            rows = [dict(r) for r in probes]
            check_probes(self.path, rows)
            rundir.write_jsonl(self.path / "probes.jsonl", rows)
        if tests or not (self.path / "tests.jsonl").exists():
            rundir.write_jsonl(self.path / "tests.jsonl", [dict(t) for t in tests])
        rundir.write_meta(self.path, producer=producer, **meta)

    @classmethod
    def peer(cls, run_dir: str | os.PathLike) -> "RunWriter":
        """The writer of a process other than the one holding the lock in a multi-process job (`moegrok
        trajectory` splits checkpoints across processes, each writes its own records): no lock, no meta; the
        processes agreed on their inputs before (`distributed.agree`)."""
        self = cls.__new__(cls)
        self.path, self._lock, self._written = Path(run_dir), None, set()
        return self

    # -- reading back what is there --
    @property
    def steps(self) -> list[int]:
        return rundir.RunDir(self.path).steps if (self.path / "meta.json").exists() else []

    # -- writing --
    def update_meta(self, **fields: Any) -> None:
        rundir.write_meta(self.path, **fields)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """One training-scalar row of metrics.jsonl."""
        self._append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def log_indicators(self, step: int, values: Mapping[str, Mapping[str, float]], **extra: Any) -> None:
        """A checkpoint's live indicators, {name: {domain or "all": value}}."""
        self._append({"step": int(step), "indicators": {n: {d: float(v) for d, v in vs.items()}
                                                         for n, vs in values.items()}, **extra})

    def _append(self, row: Mapping[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_checkpoint(self, step: int, probe: Mapping[str, Any], eval_: Mapping[str, Any] | None = None, *,
                         replace: bool = False) -> Path:
        """One checkpoint's probe record (fields of `rundir.PROBE_FIELDS`, e.g. from `probe_arrays`) and evaluation
        ({"val_loss": {domain: x}, "test": {domain: {"accuracy", "ids", "correct"}}, "param_norms": {...}}),
        written atomically: a crash mid-write leaves every earlier record as it was. A step already recorded is
        refused unless ``replace`` (a resumed trainer replays the steps after its last checkpoint)."""
        step = int(step)
        if step < 0:
            raise MoegrokError(f"{self.path}: step must be >= 0, got {step}")
        done = self.path / rundir.RECORDS / rundir.step_dirname(step)
        if not replace and (step in self._written or done.exists()):
            raise MoegrokError(f"{done}: step {step} is already recorded; a step is written once")
        ev = {"val_loss": {}, "test": {}, **dict(eval_ or {})}
        out = rundir.write_record(self.path, step, probe, ev)
        self._written.add(step)
        return out

    def finish(self) -> None:
        rundir.write_meta(self.path, finished=True)

    def close(self) -> None:
        if self._lock is not None:
            release_lock(self._lock)
            self._lock = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
