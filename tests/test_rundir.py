"""The run directory contract (docs/rundir.md): every documented field round-trips through the
writers and RunDir, partial and foreign files are invisible or named in a clear error, writes are atomic."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moegrok.rundir import (FORMAT, OPTIONAL_PROBE_FIELDS, PROBE_FIELDS, RunDir, RunDirError, atomic_dir,
                            step_dirname, write_jsonl, write_meta, write_record, write_text)

N, L, E, D, T, K = 5, 2, 4, 3, 6, 2


def probe(seed=0, answer=True):
    rng = np.random.default_rng(seed)
    p = rng.random((N, L, E))
    out = {"sample_ids": np.arange(N), "domains": np.array(["a", "a", "b", "b", "b"]),
           "sample_loss": rng.random(N).astype(np.float32), "route_probs": (p / p.sum(-1, keepdims=True)),
           "router_weights": rng.normal(size=(L, E, D)).astype(np.float32),
           "topk_ids": rng.integers(0, E, size=(N, T, L, K)), "topk_weights": rng.random((N, T, L, K)),
           "token_mask": rng.random((N, T)) > 0.2, "tokens": rng.integers(0, 9, size=(N, T))}
    if answer:
        out["answer_loss"] = np.where(np.arange(N) % 2, np.nan, 1.0).astype(np.float32)
    return out


EVAL = {"val_loss": {"a": 1.5, "b": 2.5},
        "test": {"a": {"accuracy": 0.5, "ids": ["t0", "t1"], "correct": [1, 0]},
                 "b": {"accuracy": 1.0, "ids": ["t2"], "correct": [1]}},
        "param_norms": {"all": 3.0, "router": 1.0, "experts": 2.0, "attention": 0.5}}


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    write_meta(d, producer="test", num_layers=L, num_experts=E, top_k=K, d_model=D, domains=["a", "b"],
               total_steps=20, finished=False)
    write_jsonl(d / "probes.jsonl", [{"id": i, "domain": "ab"[i > 1], "text": f"x{i}"} for i in range(N)])
    write_jsonl(d / "tests.jsonl", [{"id": f"t{i}", "domain": "a", "prompt": "p", "answer": "q"} for i in range(3)])
    write_text(d / "metrics.jsonl", json.dumps({"step": 10, "loss": 1.0}) + "\n"
               + json.dumps({"step": 10, "indicators": {"train_loss": {"a": 0.5}}}) + "\n")
    write_text(d / "config.yaml", "model: {hidden_size: 3}\n")
    for s in (10, 20):
        write_record(d, s, probe(s), EVAL)
    return d


def test_every_documented_field_round_trips(run):
    rd = RunDir(run)
    assert rd.meta["format"] == FORMAT and rd.meta["domains"] == ["a", "b"] and not rd.finished
    assert rd.steps == [10, 20]
    want = probe(20)
    got = rd.probe(20)
    for name in list(PROBE_FIELDS) + list(OPTIONAL_PROBE_FIELDS):
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=name)
    assert (got.num_layers, got.num_experts) == (L, E)
    ev = rd.eval(20)
    assert ev.val_loss == EVAL["val_loss"] and ev.accuracy == {"a": 0.5, "b": 1.0}
    assert ev.test_ids["a"] == ["t0", "t1"] and ev.correct["a"].tolist() == [True, False]
    assert ev.param_norms == EVAL["param_norms"]
    assert [p["id"] for p in rd.probes] == list(range(N)) and len(rd.tests) == 3
    assert rd.metrics() == [{"step": 10, "loss": 1.0}]
    assert rd.live_indicators() == {10: {"train_loss": {"a": 0.5}}}
    assert rd.config == {"model": {"hidden_size": 3}}
    write_meta(run, finished=True)
    assert RunDir(run).finished and RunDir(run).meta["producer"] == "test"  # write_meta merges


def test_optional_fields_may_be_absent(run):
    write_record(run, 30, probe(30, answer=False), {k: v for k, v in EVAL.items() if k != "param_norms"})
    rd = RunDir(run)
    assert rd.probe(30).answer_loss is None and rd.eval(30).param_norms == {}


def test_partial_and_leftover_records_are_invisible(run):
    rec = run / "records"
    (rec / step_dirname(40)).mkdir()  # a crash before probe.npz + eval.json were both there
    (rec / step_dirname(40) / "probe.npz").write_bytes(b"")
    (rec / ".step_000000050.tmp-1234").mkdir()  # an atomic write that never finished
    (rec / "notes").mkdir()
    assert RunDir(run).steps == [10, 20]


def test_rewriting_a_step_swaps_it_whole(run):
    write_record(run, 20, probe(99), EVAL)
    np.testing.assert_array_equal(RunDir(run).probe(20).tokens, probe(99)["tokens"])
    assert sorted(p.name for p in (run / "records").iterdir()) == [step_dirname(10), step_dirname(20)]


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: (d / "meta.json").unlink(), "meta.json: missing"),
    (lambda d: (d / "meta.json").write_text("{oops"), "meta.json: not valid JSON"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"format": "other/2"})), "field 'format' is 'other/2'"),
])
def test_foreign_or_broken_meta_is_named(run, mutate, needle):
    mutate(run)
    with pytest.raises(RunDirError, match=needle):
        RunDir(run)


def test_broken_record_files_are_named(run):
    rd = RunDir(run)
    (run / "records" / step_dirname(10) / "probe.npz").write_bytes(b"not a zip")
    with pytest.raises(RunDirError, match=r"step_000000010/probe.npz: unreadable probe record"):
        rd.probe(10)
    (run / "records" / step_dirname(20) / "eval.json").write_text("{")
    with pytest.raises(RunDirError, match=r"step_000000020/eval.json: not valid JSON"):
        rd.eval(20)
    with pytest.raises(RunDirError, match=r"no record for step 30; available steps: \[10, 20\]"):
        rd.eval(30)
    (run / "probes.jsonl").write_text('{"id": 0}\n{bad\n')
    with pytest.raises(RunDirError, match=r"probes.jsonl:2: not valid JSON"):
        rd.probes
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir(run / "nope")


@pytest.mark.parametrize("field, bad, needle", [
    ("route_probs", np.ones((N, L)), "expected \\[N, L, E\\]"),
    ("tokens", np.ones((N + 1, T), int), "N=6 but an earlier field has N=5"),
    ("token_mask", np.ones((N, T), np.float32), "expected kind 'b'"),
])
def test_bad_probe_arrays_are_refused_before_anything_is_written(run, field, bad, needle):
    p = probe()
    p[field] = bad
    with pytest.raises(RunDirError, match=needle):
        write_record(run, 30, p, EVAL)
    p = probe()
    del p["tokens"]
    with pytest.raises(RunDirError, match="missing probe field 'tokens'"):
        write_record(run, 30, p, EVAL)
    assert not any(n.name.startswith(".") or n.name.endswith("030") for n in (run / "records").iterdir())


def test_atomic_dir_leaves_the_old_directory_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "1" and os.listdir(tmp_path) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["model"]


def test_meta_is_one_schema(tmp_path):
    """meta.json holds RunMeta's fields only: an unknown field is refused, and what is written reads back."""
    from moegrok.errors import MoegrokError
    from moegrok.rundir import META_FIELDS, RunMeta, write_meta

    write_meta(tmp_path, producer="train", num_layers=2, num_experts=4, top_k=1, d_model=8, domains=["a"],
               total_steps=10)
    with pytest.raises(MoegrokError, match=r"unknown field\(s\) \['num_layer'\]"):
        write_meta(tmp_path, num_layer=3)
    write_meta(tmp_path, finished=True)
    m = RunDir(tmp_path).run_meta
    assert m == RunMeta(producer="train", num_layers=2, num_experts=4, top_k=1, d_model=8, domains=["a"],
                        total_steps=10, finished=True)
    assert set(json.loads((tmp_path / "meta.json").read_text())) <= set(META_FIELDS)


def test_every_producer_writes_the_shape_fields(tmp_path):
    """The trainer and the OLMoE pipeline both fill the fields consumers rely on (total_steps included)."""
    from pathlib import Path

    from moegrok.training.config import load_config_file
    from moegrok.training.train import RunConfig, train

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = RunConfig.from_dict(load_config_file(tiny, ["data.num_steps=4", "train.num_checkpoints=1"]))
    train(cfg, tmp_path / "t", progress=False)
    meta = RunDir(tmp_path / "t").run_meta
    for f in ("producer", "num_layers", "num_experts", "top_k", "d_model", "total_steps"):
        assert getattr(meta, f) is not None, f
    assert meta.total_steps == 4 and meta.finished and meta.domains
