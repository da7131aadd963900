"""RunWriter, the one producer of run directories: records built from NumPy arrays against a brute-force reference,
one-line refusals naming the field or file, one writer at a time (also across processes and after kill -9), and a
crash in the middle of a write that leaves the earlier records as they were."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from moegrok import RunDir
from moegrok.errors import MoegrokError
from moegrok.writer import RunLockedError, RunWriter, probe_arrays

N, T, L, E, K, D = 3, 5, 2, 4, 2, 6


def raw(seed: int = 0, router: str = "softmax"):
    rng = np.random.default_rng(seed)
    mask = np.ones((N, T), bool)
    mask[1, 3:] = False
    logits = rng.normal(size=(N, T, L, E)).astype(np.float32)
    ids = np.argsort(-logits, axis=-1)[..., :K]
    return dict(tokens=rng.integers(0, 50, (N, T)), token_mask=mask, sample_loss=rng.random(N).astype(np.float32),
                topk_ids=ids, router_weights=rng.normal(size=(L, E, D)).astype(np.float32), sample_ids=[7, 8, 9],
                domains=["a", "a", "b"], router_logits=logits, router=router)


def brute_g(logits, router):
    """METHOD §4, one token at a time."""
    out = np.zeros_like(logits, dtype=np.float64)
    for idx in np.ndindex(*logits.shape[:-1]):
        x = logits[idx].astype(np.float64)
        s = np.exp(x) / np.exp(x).sum() if router == "softmax" else 1 / (1 + np.exp(-x))
        out[idx] = s / s.sum()
    return out


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_record_from_router_logits_matches_brute_force(router):
    r = raw(1, router)
    rec = probe_arrays(**r)
    g = brute_g(r["router_logits"], router)
    for n in range(N):
        real = np.flatnonzero(r["token_mask"][n])
        np.testing.assert_allclose(rec["route_probs"][n], g[n, real].mean(0), atol=1e-6)
        for t in range(T):
            for layer in range(L):
                want = g[n, t, layer, r["topk_ids"][n, t, layer]] if t in real else np.zeros(K)
                np.testing.assert_allclose(rec["topk_weights"][n, t, layer], want, atol=1e-6)
    assert (rec["topk_ids"][1, 3:] == 0).all()
    assert rec["tokens"].dtype == np.int32 and rec["sample_ids"].dtype == np.int64


BAD = {
    "tokens as floats": (dict(tokens=np.zeros((N, T), np.float32)), r"field 'tokens' has dtype float32"),
    "mask shape": (dict(token_mask=np.ones((N, T + 1), bool)), r"field 'token_mask' has shape \(3, 6\)"),
    "ids outside E": (dict(topk_ids=np.full((N, T, L, K), E)), r"field 'topk_ids' has expert ids 4\.\.4"),
    "layers disagree": (dict(router_weights=np.zeros((L + 1, E, D), np.float32)), r"'topk_ids' has L=2 layers"),
    "logits shape": (dict(router_logits=np.zeros((N, T, L, E + 1), np.float32)), r"field 'router_logits' has shape"),
    "unknown router": (dict(router="relu"), r"field 'router' must be one of"),
    "both routings": (dict(route_probs=np.zeros((N, L, E), np.float32)), r"exactly one of 'route_probs'"),
    "too few losses": (dict(sample_loss=np.zeros(N - 1, np.float32)), r"sample_loss 2"),
    "loss as ints": (dict(sample_loss=np.zeros(N, np.int64)), r"field 'sample_loss' has dtype int64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arrays_are_refused_naming_the_field(case):
    change, msg = BAD[case]
    with pytest.raises(MoegrokError, match=msg) as e:
        probe_arrays(**{**raw(), **change})
    assert "\n" not in str(e.value)


def writer(path, **kw):
    probes = [{"id": i, "domain": d, "text": f"t{i}"} for i, d in zip((7, 8, 9), "aab")]
    meta = dict(num_layers=L, num_experts=E, top_k=K, d_model=D, domains=["a", "b"], model_type="toy",
                router="softmax")
    return RunWriter(path, producer=kw.pop("producer", "test"), meta={**meta, **kw.pop("meta", {})},
                     probes=kw.pop("probes", probes), **kw)


def test_written_run_reads_back_and_refuses_misuse(tmp_path):
    run = tmp_path / "run"
    with writer(run) as w:
        rec = probe_arrays(**raw())
        w.log(1, {"loss": 2.0})
        w.write_checkpoint(10, rec, {"test": {"a": {"accuracy": 0.5, "ids": [1, 2], "correct": [1, 0]}}})
        w.log_indicators(10, {"train_loss": {"a": 1.5}})
        with pytest.raises(MoegrokError, match=r"step_000000010: step 10 is already recorded"):
            w.write_checkpoint(10, rec)
        bad = {**rec, "topk_weights": rec["topk_weights"][..., :1]}
        with pytest.raises(MoegrokError, match=r"probe field 'topk_weights' has k=1"):
            w.write_checkpoint(20, bad)
        w.finish()
    rd = RunDir(run)
    assert rd.steps == [10] and rd.finished and rd.eval(10).accuracy == {"a": 0.5}
    np.testing.assert_array_equal(rd.probe(10).route_probs, rec["route_probs"])
    assert rd.metrics() == [{"step": 1, "loss": 2.0}] and rd.live_indicators() == {10: {"train_loss": {"a": 1.5}}}
    # Resuming the same run: allowed, and it knows what is there; another run's directory is refused by name.
    with writer(run) as w:
        assert w.steps == [10]
    with pytest.raises(MoegrokError, match=r"probes\.jsonl: holds another probe set"):
        writer(run, probes=[{"id": 1, "domain": "a", "text": "other"}])
    with pytest.raises(MoegrokError, match=r"meta\.json: field 'num_experts' is 4, this run has 16"):
        writer(run, meta={"num_experts": 16})
    with pytest.raises(MoegrokError, match=r"meta\.json: written by producer 'test', this writer is 'train'"):
        writer(run, producer="train")
    with writer(run):  # the refusals released the lock they took
        pass


HOLD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from moegrok.writer import RunWriter
    w = RunWriter(sys.argv[1], producer="test")
    if len(sys.argv) > 2:  # die in the middle of writing a record: the npz half written
        import moegrok.rundir as rd
        real = np.savez
        def slow(f, **arrays):
            f.write(b"PK" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        rd.np.savez = slow
        from tests.test_writer import probe_arrays, raw
        w.write_checkpoint(int(sys.argv[2]), probe_arrays(**raw()))
    print("holding", flush=True)
    time.sleep(60)
""")


def hold(run, *args):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run), *args], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline().strip() in ("holding", "writing")
    return p


def test_one_writer_at_a_time_and_kill_9_leaves_the_last_record(tmp_path):
    run = tmp_path / "run"
    with writer(run) as w:
        w.write_checkpoint(10, probe_arrays(**raw()))
    p = hold(run, "20")  # another process, killed while it writes step 20
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=rf"already being written by pid {p.pid} on host .+ since \d{{4}}-"):
            writer(run)
        assert time.monotonic() - t0 < 1.0
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    rd = RunDir(run)
    assert rd.steps == [10]  # the half-written step is not listed; the earlier one reads as written
    np.testing.assert_array_equal(rd.probe(10).route_probs, probe_arrays(**raw())["route_probs"])
    with writer(run) as w:  # the killed holder's lock is free: the next writer takes over and continues
        w.write_checkpoint(20, probe_arrays(**raw(2)))
    assert RunDir(run).steps == [10, 20]
    assert json.loads((run / "meta.json").read_text())["producer"] == "test"


def test_writing_needs_numpy_only(tmp_path):
    """Any training process can write records: importing the writer and writing one record loads neither JAX nor
    torch."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from moegrok.writer import RunWriter, probe_arrays
        rng = np.random.default_rng(0)
        rec = probe_arrays(tokens=np.ones((2, 3), np.int64), token_mask=np.ones((2, 3), bool),
                           sample_loss=np.ones(2, np.float32), topk_ids=np.zeros((2, 3, 1, 1), np.int64),
                           router_weights=np.ones((1, 2, 4), np.float32), sample_ids=[0, 1], domains=["a", "a"],
                           router_logits=rng.normal(size=(2, 3, 1, 2)).astype(np.float32), router="sigmoid")
        with RunWriter({str(tmp_path / 'run')!r}, producer="test") as w:
            w.write_checkpoint(1, rec)
        heavy = sorted(m for m in ("jax", "torch", "transformers", "flax") if m in sys.modules)
        print(heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert RunDir(tmp_path / "run").steps == [1]
