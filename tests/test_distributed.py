"""Several processes on one machine (127.0.0.1, one CPU device each) train one run together: the losses and probe
records equal a one-process, two-device run's; a killed process stops the other with a clear message, and relaunching
both resumes exactly; bad flags, a missing coordinator and different configs are refused clearly."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moegrok import RunDir

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SHORT = ["data.num_steps=60", "train.num_checkpoints=3", "train.log_every=5"]  # checkpoints at 20, 40, 60
TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS",
                                                          "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    e["JAX_PLATFORMS"] = "cpu"
    return e


def moegrok(*args) -> list[str]:
    return [sys.executable, "-m", "moegrok.cli", *map(str, args)]


def launch(run_dir: Path, extra=(), per_process=None, port=None) -> list[subprocess.Popen]:
    port = port or free_port()
    procs = []
    for i in range(2):
        more = per_process[i] if per_process else []
        procs.append(subprocess.Popen(
            moegrok("train", TINY, "--run-dir", run_dir, "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", 2, "--process-id", i, "--distributed-timeout", TIMEOUT,
                    "train.mesh_data=2", *SHORT, *extra, *more),
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=400) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process of the run hung")
        out.append((p.returncode, err))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, two CPU devices, the same mesh."""
    run_dir = tmp_path_factory.mktemp("dist") / "one"
    r = subprocess.run(moegrok("train", TINY, "--run-dir", run_dir, "--no-progress", "train.mesh_data=2", *SHORT),
                       env=env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return RunDir(run_dir)


def assert_same_run(a: RunDir, b: RunDir, tol=1e-5):
    ma, mb = a.metrics(), b.metrics()
    assert [m["step"] for m in ma] == [m["step"] for m in mb] and len(ma) == 12
    for x, y in zip(ma, mb):
        for k in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(y[k])), (x["step"], k, x[k], y[k])
    assert a.steps == b.steps == [20, 40, 60]
    for step in a.steps:
        pa, pb = a.probe(step), b.probe(step)
        for k in ("sample_loss", "answer_loss", "route_probs", "topk_weights", "router_weights"):
            np.testing.assert_allclose(getattr(pa, k), getattr(pb, k), atol=tol, rtol=0, err_msg=f"{step} {k}")
        np.testing.assert_array_equal(pa.topk_ids, pb.topk_ids)
        np.testing.assert_array_equal(pa.sample_ids, pb.sample_ids)
        ea, eb = a.eval(step), b.eval(step)
        for d in eb.val_loss:
            assert abs(ea.val_loss[d] - eb.val_loss[d]) <= tol
            np.testing.assert_array_equal(ea.correct[d], eb.correct[d])
    assert a.live_indicators().keys() == b.live_indicators().keys()


def test_two_processes_equal_one(one_process, tmp_path):
    run_dir = tmp_path / "two"
    results = finish(launch(run_dir))
    for rc, err in results:
        assert rc == 0, err[-3000:]
    two = RunDir(run_dir)
    assert two.finished
    assert_same_run(two, one_process)
    # process 0 alone wrote: one metrics row per logged step, no stray temporary files
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_killed_process_stops_the_other_and_both_resume(one_process, tmp_path):
    run_dir = tmp_path / "killed"
    procs = launch(run_dir)
    first = run_dir / "records" / "step_000000020"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.2)
    assert first.exists(), "the run never reached its first checkpoint"
    procs[1].kill()  # SIGKILL
    t0 = time.monotonic()
    rc, err = finish(procs[:1], timeout=TIMEOUT + 90)[0]
    assert rc != 0
    assert "lost contact with another process" in err and "start every process again" in err, err[-3000:]
    assert time.monotonic() - t0 < TIMEOUT + 60
    procs[1].wait()
    results = finish(launch(run_dir))
    for rc, err in results:
        assert rc == 0, err[-3000:]
    assert_same_run(RunDir(run_dir), one_process)


def test_mismatched_configs_are_refused(tmp_path):
    run_dir = tmp_path / "mismatch"
    results = finish(launch(run_dir, per_process=[["train.learning_rate=0.001"], ["train.learning_rate=0.002"]]))
    for i, (rc, err) in enumerate(results):
        assert rc == 1
        assert "differs between processes" in err and f"this is process {i}" in err, err[-2000:]
        assert "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize("args, message", [
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id: expected an integer in [0, 2)"),
    (["--num-processes", "2"], "also give --coordinator"),
    (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "1"], "expected HOST:PORT"),
])
def test_bad_flags(tmp_path, args, message):
    r = subprocess.run(moegrok("train", TINY, "--run-dir", tmp_path / "r", *args), env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_missing_coordinator_is_named_within_the_timeout(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    r = subprocess.run(moegrok("train", TINY, "--run-dir", tmp_path / "r", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", 2, "--process-id", 1, "--distributed-timeout", 3),
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"no coordinator answered at 127.0.0.1:{port} within 3 s" in r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "r").exists()


def test_environment_variables_are_read(tmp_path, monkeypatch):
    """Flags win over the environment; the environment fills what the flags leave out."""
    import argparse

    from moegrok import distributed

    ns = argparse.Namespace(distributed=True, coordinator=None, num_processes=None, process_id=1,
                            distributed_timeout=5)
    got = distributed.resolve(ns, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:999", "JAX_NUM_PROCESSES": "4",
                                   "JAX_PROCESS_ID": "3"})
    assert got == {"coordinator": "10.0.0.1:999", "num_processes": 4, "process_id": 1, "timeout": 5}
    ns.process_id = None
    assert distributed.resolve(ns, {})["num_processes"] is None  # a cluster launcher's job then
    from moegrok.errors import MoegrokError

    with pytest.raises(MoegrokError, match="JAX_NUM_PROCESSES='two'"):
        distributed.resolve(ns, {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"})
