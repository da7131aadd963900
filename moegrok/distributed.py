"""Several processes (hosts), one run: start-up, the single writer, barriers, and host copies of global arrays.

A multi-process run is the same command started once per process. Each process builds the same global batch (a
pure function of the step) and feeds its devices' shards; process 0 alone writes the run directory (config, logs,
records, TensorBoard) while orbax writes the checkpoints the multi-process way (every process its shards, the
primary finalises). The other processes meet it at barriers, so a resume restores the same step everywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from typing import Any

from moegrok.errors import MoegrokError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DEFAULT_TIMEOUT = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes or hosts (docs/scaling.md)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run: the coordinator, the number of processes and this process's id "
                        f"come from the flags below, else from ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
                        f"${ENV_PROCESS_ID}, else from a cluster launcher JAX detects (SLURM, Open MPI)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (implies --distributed)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (implies --distributed)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (implies --distributed)")
    g.add_argument("--distributed-timeout", type=int, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for the coordinator at start-up, and for a silent process before the "
                        f"others stop (default {DEFAULT_TIMEOUT})")


def requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "distributed", False) or getattr(args, "coordinator", None)
                or getattr(args, "num_processes", None) is not None or getattr(args, "process_id", None) is not None)


def resolve(args: argparse.Namespace, environ=os.environ) -> dict[str, Any]:
    """(coordinator, num_processes, process_id) from the flags, else the environment; None where neither says
    (then `jax.distributed.initialize` asks the cluster launcher). Checked before anything starts."""
    def pick(flag, env, cast):
        v = getattr(args, flag, None)
        if v is not None:
            return v
        raw = environ.get(env)
        if raw in (None, ""):
            return None
        try:
            return cast(raw)
        except ValueError:
            raise MoegrokError(f"environment variable {env}={raw!r}: expected an integer") from None

    out = {"coordinator": pick("coordinator", ENV_COORDINATOR, str),
           "num_processes": pick("num_processes", ENV_NUM_PROCESSES, int),
           "process_id": pick("process_id", ENV_PROCESS_ID, int)}
    n, i = out["num_processes"], out["process_id"]
    if n is not None and n < 1:
        raise MoegrokError(f"--num-processes: expected an integer >= 1, got {n}")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise MoegrokError(f"--process-id: expected an integer in [0, {n if n is not None else 'N'}) (one id per "
                           f"process, 0 is the coordinator), got {i}")
    if (n is None) != (i is None) or (n is not None and out["coordinator"] is None and n > 1):
        missing = [name for name, v in (("--coordinator / $" + ENV_COORDINATOR, out["coordinator"]),
                                        ("--num-processes / $" + ENV_NUM_PROCESSES, n),
                                        ("--process-id / $" + ENV_PROCESS_ID, i)) if v is None]
        raise MoegrokError(f"--distributed: also give {', '.join(missing)} (or none of them, under a cluster "
                           "launcher JAX detects such as SLURM)")
    timeout = getattr(args, "distributed_timeout", DEFAULT_TIMEOUT)
    if timeout is None or timeout < 1:
        raise MoegrokError(f"--distributed-timeout: expected seconds >= 1, got {timeout}")
    out["timeout"] = int(timeout)
    return out


def initialize(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` with the resolved settings; CPU processes talk through gloo. A coordinator that
    does not answer within the timeout is one error naming its address."""
    how = resolve(args)
    if how["coordinator"] and how["num_processes"] and how["num_processes"] > 1:
        _check_coordinator(how["coordinator"], how["process_id"], how["timeout"])
    import jax

    try:  # CPU hosts need a collectives implementation for cross-process psum / all-gather
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - an older/newer JAX without the option: its default then
        pass
    try:
        jax.distributed.initialize(
            coordinator_address=how["coordinator"], num_processes=how["num_processes"],
            process_id=how["process_id"], initialization_timeout=how["timeout"],
            heartbeat_timeout_seconds=how["timeout"], shutdown_timeout_seconds=how["timeout"])
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = how["coordinator"] or "the address the cluster launcher gave"
        raise MoegrokError(f"--distributed: could not join the run through the coordinator at {where} within "
                           f"{how['timeout']} s (process {how['process_id']} of {how['num_processes']}): {first}. "
                           "Start process 0 first, with the same --coordinator, on a reachable host:port") from None


class ProcessLost(MoegrokError):
    """Another process of the run stopped (killed, crashed, its host gone): this one cannot go on alone."""


_PEER_SIGNS = ("gloo", "heartbeat", "barrier", "connection closed", "connection reset", "unavailable",
               "deadline_exceeded", "coordination service")


def peer_failure(err: BaseException) -> bool:
    """Whether an error raised in a multi-process run says another process is gone (JAX's runtime error, or orbax
    re-raising one from its barriers as a ValueError)."""
    import jax

    text = str(err).lower()
    return jax.process_count() > 1 and (isinstance(err, jax.errors.JaxRuntimeError)
                                        or any(sign in text for sign in _PEER_SIGNS))


def lost(err: BaseException, where: str, last_checkpoint: int | None) -> ProcessLost:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    ckpt = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
    return ProcessLost(f"lost contact with another process of this {process_count()}-process run {where} ({first}). "
                       f"The last complete checkpoint is {ckpt}; start every process again with the same command "
                       "to resume from it")


def exit_after_loss(err: ProcessLost, command: str) -> None:
    """Print the error and leave at once: a normal exit would wait at JAX's shutdown barrier for the process that is
    gone, then abort with a C++ stack trace."""
    import sys

    print(f"moegrok {command}: error: {err}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _check_coordinator(address: str, process_id: int, timeout: int) -> None:
    """Fail early and clearly where JAX would abort the process from C++: process 0 must be able to listen on the
    address, the others to reach it (they wait up to `timeout` for process 0 to start)."""
    import socket
    import time

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MoegrokError(f"--coordinator {address!r}: expected HOST:PORT, e.g. 10.0.0.1:12355")
    host = host.strip("[]")
    if process_id == 0:
        try:
            with socket.create_server(("" if host not in ("127.0.0.1", "localhost", "::1") else host, int(port)),
                                      reuse_port=False):
                return
        except OSError as e:
            raise MoegrokError(f"--coordinator {address}: process 0 cannot listen on port {port} ({e.strerror}); "
                               "pick a free port") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise MoegrokError(f"--distributed: no coordinator answered at {address} within {timeout} s "
                                   f"(process {process_id}); start process 0 with the same --coordinator, and check "
                                   "the host and port are reachable from here (--distributed-timeout to wait "
                                   "longer)") from None
            time.sleep(0.25)


_ALONE = False


@contextlib.contextmanager
def alone():
    """Inside, this process works as if it were the only one (no row sharing, no gathering): for work split by
    item across processes, such as `moegrok olmoe`'s checkpoints."""
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def process_count() -> int:
    """Processes working together on the current step (1 inside `alone()`)."""
    import jax

    return 1 if _ALONE else jax.process_count()


def my_share(items: list) -> list:
    """This process's items when a list is split across processes (round robin)."""
    import jax

    return items[jax.process_index()::jax.process_count()]


def is_writer() -> bool:
    """Process 0 writes the run directory; the others only read it."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes reach `name` before any goes on (a no-op in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: Any, what: str) -> None:
    """Every process holds the same `value` (e.g. its resolved config); otherwise each stops with an error naming
    the processes that differ from process 0."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()[:8]
    mine = np.frombuffer(digest, np.uint8).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise MoegrokError(f"--distributed: {what} differs between processes (process {differ} vs process 0; this is "
                           f"process {jax.process_index()}); start every process with the same config, overrides "
                           "and flags")


def host_local(tree):
    """A copy of a pytree of (possibly multi-process) arrays that this process can read: a replicated global array
    gives its local replica, a sharded one is gathered. Identity in one process."""
    import jax

    if process_count() == 1:
        return tree

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.sharding.is_fully_replicated:
            return x.addressable_data(0)
        from jax.experimental import multihost_utils

        return jax.numpy.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def gather_rows(tree, n: int):
    """Concatenate every process's rows of a pytree of host arrays (each process holds an equal share, the last
    padded) along axis 0 and keep the first `n`: the whole result on every process."""
    if process_count() == 1:
        return tree
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda a: np.asarray(a)[:n], got)


def row_share(n: int) -> tuple[int, int, int]:
    """This process's rows of `n`: (start, stop, share), `share` = rows every process computes (the last pads)."""
    import jax

    p = process_count()
    share = -(-n // p) if n else 0
    start = min(n, (jax.process_index() if p > 1 else 0) * share)
    return start, min(n, start + share), share
