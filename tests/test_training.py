"""Trainer: one epoch exactly once (also across SIGKILL + resume, bitwise), sharded == single device, records,
config and fault handling."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from moegrok import RunDir
from moegrok.errors import MoegrokError
from moegrok.rundir import PROBE_FIELDS
from moegrok.training.config import load_config_file
from moegrok.training.train import RunConfig, checkpoint_steps, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SHORT = ["data.num_steps=40", "train.checkpoint_every=10", "train.log_every=5", "train.tensorboard=false"]


def tiny_cfg(*overrides: str) -> RunConfig:
    return RunConfig.from_dict(load_config_file(TINY, [*SHORT, *overrides]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train(tiny_cfg(), run_dir, progress=False, log_sample_ids=True)
    return run_dir


def test_tiny_run_writes_records(tiny_run):
    rd = RunDir(tiny_run)
    assert rd.steps == [10, 20, 30, 40]
    assert rd.finished
    cfg = tiny_cfg()
    probes = rd.probes
    for step in rd.steps:
        p = rd.probe(step)
        n, L, E = p.route_probs.shape
        assert (L, E) == (cfg.model.num_hidden_layers, cfg.model.num_experts) and n == len(probes)
        assert p.router_weights.shape == (L, E, cfg.model.hidden_size)
        assert p.topk_ids.shape[2:] == (L, cfg.model.num_experts_per_tok)
        np.testing.assert_allclose(p.route_probs.sum(-1), 1.0, atol=1e-5)
        assert np.all(p.sample_loss > 0) and np.all(np.isfinite(p.sample_loss))
        assert [int(i) for i in p.sample_ids] == [r["id"] for r in probes]
        # top-k ids of real tokens are distinct per (token, layer), weights descending
        ids = p.topk_ids[p.token_mask]
        assert np.all(ids[..., 0] != ids[..., 1])
        assert np.all(np.diff(p.topk_weights[p.token_mask], axis=-1) <= 0)
        ev = rd.eval(step)
        assert set(ev.accuracy) == set(rd.meta["domains"])
        for d, acc in ev.accuracy.items():
            assert acc == pytest.approx(ev.correct[d].mean())
    losses = [m["loss"] for m in rd.metrics()]
    assert [m["step"] for m in rd.metrics()] == list(range(5, 41, 5))
    assert losses[-1] < losses[0]  # it learns


def test_probe_loss_and_routing_match_an_independent_forward(tiny_run):
    """The record's per-sample NLL and token-mean router softmax, recomputed with NumPy from the model's raw
    outputs (logits, router logits) on one sample at a time without padding."""
    import jax.numpy as jnp

    from moegrok.model.model import MoeLM, set_params
    from moegrok.training.train import checkpoint_manager

    cfg = tiny_cfg()
    rd = RunDir(tiny_run)
    rec = rd.probe(40)
    model = MoeLM(cfg.model)
    mngr = checkpoint_manager(Path(tiny_run))
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(Path(tiny_run).absolute() / "checkpoints" / "40" / "params")
    mngr.close()
    set_params(model, params)
    from moegrok.data import build_corpus

    answer_NxT = build_corpus(cfg.data).probe_set()["answer_mask"]
    assert rec.answer_loss is not None and answer_NxT.any(axis=1).all()
    for i in [0, 5, len(rec.sample_ids) - 1]:
        n = int(rec.token_mask[i].sum())
        toks = rec.tokens[i, :n][None]
        out = model(jnp.asarray(toks))
        logits = np.asarray(out.logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll = -np.mean([logp[t, toks[0, t + 1]] for t in range(n - 1)])
        assert rec.sample_loss[i] == pytest.approx(nll, abs=1e-4)
        ans = [t for t in range(n - 1) if answer_NxT[i, t + 1]]  # positions predicting an answer token
        assert rec.answer_loss[i] == pytest.approx(-np.mean([logp[t, toks[0, t + 1]] for t in ans]), abs=1e-4)
        rl = np.asarray(out.router_logits[:, 0], np.float64)  # [L, T, E]
        probs = np.exp(rl - rl.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(rec.route_probs[i], probs.mean(1), atol=1e-5)
        top = np.argsort(-probs, axis=-1, kind="stable")[..., :2]  # [L, T, k]
        np.testing.assert_array_equal(rec.topk_ids[i, :n], top.transpose(1, 0, 2))


def test_every_sample_seen_exactly_once(tiny_run):
    from moegrok.data import build_corpus

    rows = [json.loads(ln) for ln in (tiny_run / "sample_ids.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    ids = [i for r in rows for i in r["ids"]]
    assert len(ids) == len(set(ids))
    corpus = build_corpus(tiny_cfg().data)
    expected = np.concatenate([corpus.batch(s)["sample_ids"] for s in range(40)])
    assert sorted(ids) == sorted(int(i) for i in expected)
    assert set(int(i) for i in RunDir(tiny_run).probe(10).sample_ids) <= set(ids)


KILL_WRAPPER = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.path import async_path
    n_kill = int(os.environ.get("KILL_AT_FINALIZE", "0"))
    count = [0]
    orig = async_path.rename
    async def rename(src, dst):
        if "tmp" in str(src) and os.path.basename(str(dst)).isdigit():  # a checkpoint step's final rename
            count[0] += 1
            if count[0] == n_kill:  # all checkpoint data written, not yet committed
                os.kill(os.getpid(), signal.SIGKILL)
        return await orig(src, dst)
    async_path.rename = rename
    from moegrok.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _train_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-c", KILL_WRAPPER, "train", str(TINY), "--run-dir", str(run_dir), "--no-progress",
            "--log-sample-ids", *SHORT]


def _params(run_dir: Path, step: int):
    import jax
    import orbax.checkpoint as ocp

    p = ocp.StandardCheckpointer().restore(run_dir.absolute() / "checkpoints" / str(step) / "params")
    return jax.tree_util.tree_leaves_with_path(p)


def test_sigkill_and_resume_is_bitwise_identical(tiny_run, tmp_path):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "KILL_AT_FINALIZE": "2"}
    r = subprocess.run(_train_cmd(run_dir), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert RunDir(run_dir).steps in ([10], [10, 20])  # the record of step 20 may precede its checkpoint
    # A second kill at a random moment (seeded, so a failure can be replayed).
    delay = random.Random(1234).uniform(2.0, 8.0)
    t_start = time.monotonic()
    proc = subprocess.Popen(_train_cmd(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Meanwhile a second trainer on the same run directory is refused at once, naming the first.
    lock = run_dir / ".moegrok.lock"
    while f"pid {proc.pid} " not in (lock.read_text() if lock.exists() else ""):
        assert proc.poll() is None and time.monotonic() - t_start < 120
        time.sleep(0.05)
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "moegrok.cli", "train", str(TINY), "--run-dir", str(run_dir),
                             "--no-progress", *SHORT], capture_output=True, text=True, timeout=60)
    refused_in = time.monotonic() - t0
    assert second.returncode == 1 and f"already being written by pid {proc.pid} on host" in second.stderr, \
        second.stderr[-2000:]
    assert len(second.stderr.strip().splitlines()) == 1 and refused_in < 1.0, (refused_in, second.stderr)
    time.sleep(max(0.0, delay - (time.monotonic() - t_start)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    r = subprocess.run(_train_cmd(run_dir), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    a, b = RunDir(tiny_run), RunDir(run_dir)
    assert a.steps == b.steps == [10, 20, 30, 40]
    for step in a.steps:
        pa, pb = a.probe(step), b.probe(step)
        for f in PROBE_FIELDS:
            np.testing.assert_array_equal(getattr(pa, f), getattr(pb, f), err_msg=f"step {step} field {f}")
        assert a.eval(step).accuracy == b.eval(step).accuracy
    for (ka, va), (kb, vb) in zip(_params(tiny_run, 40), _params(run_dir, 40)):
        assert ka == kb
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    rows = [json.loads(ln) for ln in (run_dir / "sample_ids.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    ids = [i for r in rows for i in r["ids"]]
    assert len(ids) == len(set(ids))
    ref = [i for ln in (tiny_run / "sample_ids.jsonl").read_text().splitlines() for i in json.loads(ln)["ids"]]
    assert ids == ref
    assert [m["step"] for m in b.metrics()] == [m["step"] for m in a.metrics()]


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from moegrok.training.config import load_config_file
    from moegrok import RunDir
    from moegrok.training.train import RunConfig, train
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, (d, e) in {"single": (1, 1), "sharded": (4, 2), "data": (4, 1)}.items():
        raw = load_config_file(sys.argv[1], sys.argv[3:] + [f"train.mesh_data={d}", f"train.mesh_expert={e}"])
        train(RunConfig.from_dict(raw), sys.argv[2] + "/" + name, progress=False)
        out[name] = [m["loss"] for m in RunDir(sys.argv[2] + "/" + name).metrics()]
    print(json.dumps(out))
""")


def test_sharded_run_matches_single_device(tmp_path):
    """8 forced host devices, data 4 x expert 2 (compiler-partitioned experts) and data 4 alone (shard_map data
    parallel) vs one device: the same losses within 1e-5 (float32 sums are reduced in another order across
    devices, so bitwise equality is not expected)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    over = ["data.num_steps=20", "train.checkpoint_every=20", "train.log_every=1", "train.tensorboard=false"]
    r = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, str(TINY), str(tmp_path), *over], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["single"]) == len(out["sharded"]) == len(out["data"]) == 20
    np.testing.assert_allclose(out["sharded"], out["single"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["data"], out["single"], atol=1e-5, rtol=0)


STEP_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from moegrok.model.config import MoeConfig
    from moegrok.model.model import MoeLM, lm_loss
    from moegrok.training.config import TrainConfig
    from moegrok.training.train import make_mesh, make_train_step, shard_batch, shard_state
    assert jax.device_count() == 2, jax.devices()
    cfg = MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05,
                    router_z_loss_coef=0.01, pad_token_id=0, eos_token_id=None)
    rs = np.random.RandomState(0)
    tokens = rs.randint(1, 64, (6, 12)).astype(np.int32)
    # Very uneven shards: rows 0-2 (device 0) keep 12, 3 and 2 tokens, rows 3-5 (device 1) keep 12, 12 and 11.
    lengths = np.array([12, 3, 2, 12, 12, 11])
    mask = np.arange(12)[None] < lengths[:, None]
    tokens[~mask] = 0
    out = {}
    for d in (1, 2):
        tcfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, mesh_data=d)
        mesh = make_mesh(tcfg)
        graphdef, state = nnx.split(MoeLM(cfg, seed=3))
        tx = optax.sgd(1.0)  # updated parameters = parameters - gradient: compares the gradients themselves
        opt = tx.init(state)
        if d == 1:  # the loss written directly with the model's whole-batch losses (HF-tested in test_model)
            o = nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.asarray(mask))
            direct = lm_loss(o.logits, jnp.asarray(tokens), jnp.asarray(mask)) + 0.05 * o.aux_loss + 0.01 * o.z_loss
            out["direct"] = float(direct)
        step = make_train_step(graphdef, tx, cfg, mesh)
        state, opt, m = step(shard_state(state, mesh), shard_state(opt, mesh), shard_batch(tokens, mesh),
                             shard_batch(mask, mesh))
        out[d] = {"metrics": {k: float(v) for k, v in m.items()},
                  "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state)]}
    print(json.dumps(out))
""")


def test_data_parallel_step_equals_one_device_on_uneven_shards():
    """The shard_map step on 2 devices, with shards holding very different numbers of real tokens, computes the
    whole batch's loss (LM mean over all tokens, load balancing pooled over all tokens, z-loss) and gradient: its
    metrics and updated parameters equal one device's, whose loss equals the model's own whole-batch losses."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-c", STEP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    assert one["metrics"]["loss"] == pytest.approx(out["direct"], rel=1e-6)
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=2e-5, abs=1e-7), k
    for a, b in zip(one["params"], two["params"]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_cli_splits_the_cpu_into_mesh_devices(tmp_path):
    """`moegrok train ... train.mesh_data=2` with no XLA_FLAGS: the CLI asks XLA for 2 host devices itself."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run_dir = tmp_path / "run"
    cli = "import sys; from moegrok.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", cli, "train", str(TINY), "--run-dir", str(run_dir), "--no-progress",
                        "data.num_steps=4", "train.checkpoint_every=4", "train.log_every=1",
                        "train.tensorboard=false", "train.mesh_data=2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert RunDir(run_dir).steps == [4] and RunDir(run_dir).finished


def test_mesh_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(MoegrokError, match="'mesh_data' \\(3\\) must divide the batch's 20 rows"):
        train(tiny_cfg("train.mesh_data=3"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_with_a_different_config_is_refused(tiny_run):
    with pytest.raises(MoegrokError, match="different config.*learning_rate"):
        train(tiny_cfg("train.learning_rate=0.01"), tiny_run, progress=False)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from moegrok.training import train as train_mod

    real = train_mod.make_train_step

    def poisoned(*a, **k):
        step = real(*a, **k)
        calls = [0]

        def wrapped(state, opt, tokens, mask):
            calls[0] += 1
            state, opt, m = step(state, opt, tokens, mask)
            if calls[0] == 15:
                m = {**m, "loss": jnp.float32(np.nan)}
            return state, opt, m

        return wrapped

    monkeypatch.setattr(train_mod, "make_train_step", poisoned)
    with pytest.raises(MoegrokError, match="non-finite loss.*step 15.*checkpoint is step 10"):
        train(tiny_cfg(), tmp_path / "run", progress=False)
    assert RunDir(tmp_path / "run").steps == [10]


@pytest.mark.parametrize("override, field", [
    ("train.schedule=wiggly", "schedule"),
    ("train.learning_rate=-1", "learning_rate"),
    ("model.num_experts_per_tok=9", "num_experts_per_tok"),
    ("model.moe_impl=sparse", "moe_impl"),
    ("train.bogus=1", "bogus"),
    ("data.num_steps=0", "num_steps"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(MoegrokError, match=field):
        tiny_cfg(override)


def test_vocab_too_small_is_named(tmp_path):
    with pytest.raises(MoegrokError, match="vocab_size"):
        train(tiny_cfg("model.vocab_size=20"), tmp_path / "r", progress=False)


def test_cli_exit_code_and_message(tmp_path, capsys):
    from moegrok.cli import main

    assert main(["train", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path / "r")]) == 1
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_checkpoint_schedule():
    from moegrok.training.config import TrainConfig

    assert checkpoint_steps(7500, TrainConfig(num_checkpoints=10)) == list(range(750, 7501, 750))
    assert checkpoint_steps(10, TrainConfig(num_checkpoints=3)) == [3, 7, 10]
    assert checkpoint_steps(25, TrainConfig(checkpoint_every=10)) == [10, 20, 25]


def test_live_indicators_equal_what_moegrok_indicators_computes(tiny_run):
    from moegrok.analysis.indicators import REGISTRY, run_indicators

    rd = RunDir(tiny_run)
    live = rd.live_indicators()
    assert sorted(live) == rd.steps
    steps, series = run_indicators(rd)
    for name in REGISTRY:
        for key, values in series[name].items():
            np.testing.assert_allclose([live[s][name][key] for s in steps], values, rtol=1e-6, equal_nan=True,
                                       err_msg=f"{name}/{key}")
    assert all("indicators" not in m for m in rd.metrics())  # training scalars stay what they were
    norms = rd.eval(40).param_norms
    assert set(norms) == {"all", "router", "experts", "attention"} and norms["all"] > norms["experts"] > 0


def test_fork_continues_the_same_epoch_with_new_optimizer_settings(tiny_run, tmp_path):
    fork = tmp_path / "fork"
    train(tiny_cfg("train.weight_decay=5.0"), fork, progress=False, log_sample_ids=True, fork=(tiny_run, 20))
    rd, parent = RunDir(fork), RunDir(tiny_run)
    assert rd.meta["parent"] == {"run_dir": str(tiny_run), "step": 20} and rd.finished
    assert rd.steps == [10, 20, 30, 40] and rd.config["train"]["weight_decay"] == 5.0
    # the epoch: parent's ids up to the fork + the fork's after it = every training sample once
    rows = [json.loads(ln) for ln in (fork / "sample_ids.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    ids = [i for r in rows for i in r["ids"]]
    parent_ids = [i for ln in (tiny_run / "sample_ids.jsonl").read_text().splitlines() for i in json.loads(ln)["ids"]]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(parent_ids)
    # history up to the fork is the parent's; after it the stronger decay shrinks the weights
    np.testing.assert_array_equal(rd.probe(20).route_probs, parent.probe(20).route_probs)
    assert rd.eval(40).param_norms["all"] < parent.eval(40).param_norms["all"]
    assert [m["step"] for m in rd.metrics()] == list(range(5, 41, 5))
    # re-running is a resume of the fork (nothing left to do), not a second fork
    train(tiny_cfg("train.weight_decay=5.0"), fork, progress=False, fork=(tiny_run, 20))
    assert RunDir(fork).steps == [10, 20, 30, 40]


@pytest.mark.parametrize("override, step, needle", [
    ("data.seed=3", 20, "data.seed"),
    ("train.weight_decay=5.0", 25, "no complete checkpoint at step 25"),
])
def test_bad_fork_is_refused_with_the_reason(tiny_run, tmp_path, override, step, needle):
    with pytest.raises(MoegrokError, match=needle):
        train(tiny_cfg(override), tmp_path / "f", progress=False, fork=(tiny_run, step))
    assert not (tmp_path / "f" / "config.yaml").exists()


def _as_saved_by_an_older_version(run_dir: Path) -> None:
    """config.yaml as an older moegrok wrote it: fields added since are absent, the then-default lowering named."""
    path = run_dir / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    for field in ("attention_impl", "remat"):
        del raw["model"][field]
    raw["model"]["moe_impl"] = "blocked"
    path.write_text(yaml.safe_dump(raw))


def test_runs_saved_by_an_older_version_fork_and_resume(tiny_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    _as_saved_by_an_older_version(old)
    fork = tmp_path / "fork"
    train(tiny_cfg("train.weight_decay=5.0"), fork, progress=False, fork=(old, 20))
    assert RunDir(fork).steps == [10, 20, 30, 40]
    # resuming the old run with today's defaults is the same run (nothing left to do), not a refusal
    train(tiny_cfg(), old, progress=False)
    assert RunDir(old).steps == [10, 20, 30, 40]
    # a real change is still named, with every default filled in on both sides
    with pytest.raises(MoegrokError, match=r"model\.hidden_size"):
        train(tiny_cfg("model.hidden_size=48"), old, progress=False)
    with pytest.raises(MoegrokError, match=r"model\.num_experts"):
        train(tiny_cfg("model.num_experts=2", "model.num_experts_per_tok=1"), tmp_path / "f2", progress=False,
              fork=(old, 20))


def test_fork_flag_is_parsed():
    from moegrok.training.train import parse_fork

    assert parse_fork("runs/a@b@300") == (Path("runs/a@b"), 300)
    with pytest.raises(MoegrokError, match="RUN_DIR@STEP"):
        parse_fork("runs/a")
