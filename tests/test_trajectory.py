"""`moegrok olmoe` on a fake trajectory of three tiny random OLMoE checkpoints: records equal transformers + torch
computed directly, resumability, errors, and `moegrok analyze` on the output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moegrok import RunDir
from moegrok.cli import main
from moegrok.errors import MoegrokError
from moegrok.trajectory import order_checkpoints, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ("the a cat dog sat ran on mat rug big small red blue one two three four five plus equals is what "
         "capital of paris rome france italy yes no").split()
TEXTS = [
    ("math", "one plus two equals three"), ("math", "two plus two equals four is what"),
    ("math", "three plus one equals four"), ("math", "one plus one equals two the"),
    ("facts", "the capital of france is paris"), ("facts", "the capital of italy is rome"),
    ("facts", "the big red cat sat on the blue mat and the small dog ran on the rug"),
    ("facts", "a dog sat"),
]
TESTS = [
    {"id": "q1", "domain": "math", "question": "one plus three equals", "choices": [" four", " two", " five"],
     "answer": 0},
    {"id": "q2", "domain": "facts", "question": "the capital of france is", "choices": [" rome", " paris"],
     "answer": 1},
    {"id": "q3", "domain": "facts", "question": "what is the capital of italy", "choices": [" rome", " paris"],
     "answer": 0},
]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS + ["and"])}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    root = tmp_path_factory.mktemp("olmoe")
    tok = make_tokenizer()
    dirs = []
    for i, name in enumerate(["step300-tokens3B", "step100-tokens1B", "step200-tokens2B"]):
        torch.manual_seed(i)
        cfg = OlmoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                          num_attention_heads=4, num_experts=6, num_experts_per_tok=2, pad_token_id=0,
                          eos_token_id=None, bos_token_id=None, max_position_embeddings=64)
        model = OlmoeForCausalLM(cfg).eval()
        with torch.no_grad():  # sharper routers than the default init, so the routing is not uniform
            for layer in model.model.layers:
                layer.mlp.gate.weight.mul_(40)
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": i, "domain": d, "text": t}) + "\n" for i, (d, t) in enumerate(TEXTS)))
    tests = root / "tests.jsonl"
    tests.write_text("".join(json.dumps(t) + "\n" for t in TESTS))
    return root, dirs, texts, tests


def hf_reference(path: Path):
    from transformers import OlmoeForCausalLM

    tok = make_tokenizer()
    model = OlmoeForCausalLM.from_pretrained(path).eval()
    loss, probs = [], []
    with torch.no_grad():
        for _, text in TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            out = model(ids, output_router_logits=True)
            lp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            loss.append(float(-lp.gather(1, ids[0, 1:, None]).mean()))
            probs.append(np.stack([torch.softmax(r.double(), -1).mean(0).numpy() for r in out.router_logits]))
        correct = {}
        for t in TESTS:
            scores = []
            q = tok(t["question"])["input_ids"]
            for c in t["choices"]:
                full = tok(t["question"] + c)["input_ids"]
                lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
                scores.append(sum(float(lp[j - 1, full[j]]) for j in range(len(q), len(full))))
            correct.setdefault(t["domain"], []).append(int(np.argmax(scores) == t["answer"]))
    return np.array(loss), np.stack(probs), correct


def test_records_match_transformers(trajectory, tmp_path):
    root, dirs, texts, tests = trajectory
    out = tmp_path / "run"
    assert main(["olmoe", "--checkpoints", *map(str, dirs), "--texts", str(texts), "--tests", str(tests),
                 "--run-dir", str(out), "--batch-size", "3", "--no-progress"]) == 0
    check_against_transformers(root, out)
    # analysis runs unchanged on the output
    assert main(["analyze", str(out), "--no-progress", "--no-figures"]) == 0
    assert (out / "analysis" / "report.md").exists()


def test_records_on_two_cpu_devices_match_transformers(trajectory, tmp_path):
    """A fresh process with `--cpu-devices 2`: each batch (3 texts, padded to 4) is split across two XLA devices
    that share the weights; records and multiple-choice answers still equal transformers'."""
    root, dirs, texts, tests = trajectory
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import sys, jax; from moegrok.cli import main; rc = main(sys.argv[1:]); "
            "assert jax.device_count() == 2, jax.devices(); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "olmoe", "--checkpoints", *map(str, dirs), "--texts", str(texts),
                        "--tests", str(tests), "--run-dir", str(out), "--batch-size", "3", "--cpu-devices", "2",
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check_against_transformers(root, out)


def test_two_processes_split_the_trajectory(trajectory, tmp_path):
    """Two processes on 127.0.0.1 share a resumed trajectory: step 100 is already recorded, the other two go one to
    each process; the records equal one process's (and transformers')."""
    import socket

    root, dirs, texts, tests = trajectory
    out, alone = tmp_path / "run", tmp_path / "alone"
    run(dirs[1:2], texts, out, tests=tests, batch_size=3, progress=False)  # step 100 only
    first = (out / "records" / "step_000000100" / "probe.npz").stat().st_mtime_ns
    run(dirs, texts, alone, tests=tests, batch_size=3, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "moegrok.cli", "olmoe", "--checkpoints", *map(str, dirs),
                               "--texts", str(texts), "--tests", str(tests), "--run-dir", str(out), "--batch-size",
                               "3", "--cpu-devices", "1", "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert (out / "records" / "step_000000100" / "probe.npz").stat().st_mtime_ns == first
    check_against_transformers(root, out)
    a, b = RunDir(out), RunDir(alone)
    for step in a.steps:
        for k in ("sample_loss", "route_probs", "topk_weights"):
            np.testing.assert_allclose(getattr(a.probe(step), k), getattr(b.probe(step), k), atol=1e-6)
        np.testing.assert_array_equal(a.probe(step).topk_ids, b.probe(step).topk_ids)
    assert a.meta["total_steps"] == 300 and a.meta["finished"]


SHARE_SCRIPT = """
import jax, numpy as np
from flax import nnx
from moegrok.model.config import MoeConfig
from moegrok.model.model import MoeLM
from moegrok.probe import _data_mesh, _replicated
assert jax.device_count() == 2
model = MoeLM(MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, num_experts=4, num_experts_per_tok=2, param_dtype="bfloat16"))
state = nnx.state(model)
rep = _replicated(state, _data_mesh())
for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(rep)):
    assert len(b.addressable_shards) == 2
    assert all(s.data.unsafe_buffer_pointer() == a.unsafe_buffer_pointer() for s in b.addressable_shards)
print("shared")
"""


def test_cpu_devices_share_the_weights_instead_of_copying():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-c", SHARE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "shared", r.stderr[-3000:]


def check_against_transformers(root: Path, out: Path):
    rd = RunDir(out)
    assert rd.steps == [100, 200, 300] and rd.finished
    for step in rd.steps:
        rec = rd.probe(step)
        loss, probs, correct = hf_reference(root / f"step{step}-tokens{step // 100}B")
        np.testing.assert_allclose(rec.sample_loss, loss, atol=1e-4)
        np.testing.assert_allclose(rec.route_probs, probs, atol=1e-4)
        assert rec.route_probs.max() > 0.5  # routing is far from uniform: the comparison has teeth
        ev = rd.eval(step)
        for d, c in correct.items():
            assert list(ev.correct[d].astype(int)) == c
    assert rd.meta["num_layers"] == 3 and rd.meta["num_experts"] == 6
    assert [r["text"] for r in rd.probes] == [t for _, t in TEXTS]


def test_resume_skips_done_checkpoints(trajectory, tmp_path, monkeypatch):
    root, dirs, texts, _ = trajectory
    out = tmp_path / "run"
    run(dirs[1:2], texts, out, progress=False)  # step 100 only
    first = (out / "records" / "step_000000100" / "probe.npz").stat().st_mtime_ns
    loaded = []
    import moegrok.convert.hf as hf

    real = hf.load_hf
    monkeypatch.setattr(hf, "load_hf", lambda p, **k: loaded.append(Path(p).name) or real(p, **k))
    run(dirs, texts, out, progress=False)
    assert sorted(loaded) == ["step200-tokens2B", "step300-tokens3B"]
    assert (out / "records" / "step_000000100" / "probe.npz").stat().st_mtime_ns == first
    assert RunDir(out).steps == [100, 200, 300]


def test_correctness_from_elsewhere(trajectory, tmp_path):
    root, dirs, texts, _ = trajectory
    cdir = tmp_path / "correct"
    cdir.mkdir()
    for d in dirs:
        (cdir / f"{d.name}.json").write_text(json.dumps({"math": {"ids": ["a", "b"], "correct": [1, 0]}}))
    out = run(dirs, texts, tmp_path / "run", correctness_dir=cdir, progress=False)
    ev = RunDir(out).eval(100)
    assert ev.accuracy == {"math": 0.5}


def test_errors(trajectory, tmp_path, capsys):
    root, dirs, texts, _ = trajectory
    with pytest.raises(MoegrokError, match="longer than max length 3"):
        run(dirs[:1], texts, tmp_path / "a", max_len=3, progress=False)
    run(dirs[:1], texts, tmp_path / "b", max_len=3, truncate=True, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "domain": "x"}\n')
    with pytest.raises(MoegrokError, match=r"bad.jsonl:1: missing field 'text'"):
        run(dirs, bad, tmp_path / "c", progress=False)
    with pytest.raises(MoegrokError, match="not a directory"):
        run([tmp_path / "nope"], texts, tmp_path / "d", progress=False)
    broken = tmp_path / "step5-tokens1B"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["olmoe", "--checkpoints", str(broken), "--texts", str(texts), "--run-dir", str(tmp_path / "e"),
                 "--no-progress"]) == 1
    assert main(["olmoe", "--checkpoints", *map(str, dirs), "--texts", str(texts), "--run-dir", str(tmp_path / "f"),
                 "--cpu-devices", "0", "--no-progress"]) == 1
    assert "cpu_devices must be a positive integer, got 0" in capsys.readouterr().err


def test_step_order_from_names(tmp_path):
    a, b, c = (tmp_path / n for n in ("step20-tokens1B", "step3-tokens1B", "final"))
    for p in (a, b, c):
        p.mkdir()
    assert [x.step for x in order_checkpoints([a, b])] == [3, 20]
    assert [x.path for x in order_checkpoints([a, c])] == [a, c]  # not all named: the order given
    assert [x.step for x in order_checkpoints([a, c])] == [1, 2]
    trainer = [tmp_path / n for n in ("checkpoint-1500", "checkpoint-500", "stage1-step900-tokens4B")]
    for p in trainer:
        p.mkdir()
    assert [x.step for x in order_checkpoints(trainer)] == [500, 900, 1500]
    assert [x.step for x in order_checkpoints([tmp_path / "checkpoint-1500", c])] == [1, 2]


# One non-default configuration per JAX family (GQA, renormalisation, shared experts, dense layers, decoder_sparse_step
# 2, qkv bias, group-limited sigmoid routing with a correction bias): both backends must write the same records.
FAMILY_CASES = {
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts=6,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=8,
                                         decoder_sparse_step=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts=6,
                                         num_experts_per_tok=2, mlp_only_layers=[0], head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8,
                                       num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                                       n_shared_experts=1, attention_bias=True, routed_scaling_factor=2.0)),
}


def family_trajectory(root: Path, case: str) -> list[Path]:
    """Three checkpoints named as transformers' Trainer names them."""
    cls, kw = FAMILY_CASES[case]
    tok = make_tokenizer()
    dirs = []
    for i, step in enumerate((40, 20, 60)):
        torch.manual_seed(100 + i)
        cfg = getattr(transformers, cls)(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         eos_token_id=None, bos_token_id=None, max_position_embeddings=64, **kw)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # sharp, non-uniform routing: ties between backends would be coincidences
            for name, p in model.named_parameters():
                p.normal_(0, 0.5 if name.endswith("gate.weight") else 0.15)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0, 0.3)
        d = root / f"checkpoint-{step}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_jax_and_torch_backends_write_the_same_records(case, trajectory, tmp_path):
    _, _, texts, tests = trajectory
    dirs = family_trajectory(tmp_path, case)
    runs = {}
    # Multiple-choice scoring through both backends for two families (its forward is the probe's forward).
    scored = ["--tests", str(tests)] if case in ("olmoe", "glm4_moe") else []
    for backend in ("jax", "torch"):
        runs[backend] = tmp_path / f"run_{backend}"
        assert main(["trajectory", "--checkpoints", *map(str, dirs), "--texts", str(texts), *scored,
                     "--run-dir", str(runs[backend]), "--backend", backend, "--batch-size", "3",
                     "--no-progress"]) == 0
    a, b = RunDir(runs["jax"]), RunDir(runs["torch"])
    assert a.steps == b.steps == [20, 40, 60]
    for key in ("num_layers", "num_experts", "top_k", "d_model", "router", "model_type"):
        assert getattr(a.run_meta, key) == getattr(b.run_meta, key), key
    assert (a.run_meta.backend, b.run_meta.backend) == ("jax", "torch")
    assert a.run_meta.model_type == case
    for step in a.steps:
        pa, pb = a.probe(step), b.probe(step)
        np.testing.assert_allclose(pa.route_probs, pb.route_probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(pa.sample_loss, pb.sample_loss, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(pa.token_mask, pb.token_mask)
        np.testing.assert_array_equal(pa.topk_ids, pb.topk_ids)
        np.testing.assert_allclose(pa.topk_weights, pb.topk_weights, atol=1e-5, rtol=0)
        np.testing.assert_allclose(pa.router_weights, pb.router_weights, atol=1e-7, rtol=0)
        assert a.eval(step).accuracy == b.eval(step).accuracy
    if case == "glm4_moe":  # the analysis reads either run directory
        for run_dir in runs.values():
            assert main(["analyze", str(run_dir), "--no-progress", "--no-figures"]) == 0


def test_bad_checkpoints_are_refused_in_one_line(trajectory, tmp_path, capsys):
    """An unknown model_type (either backend), weights that disagree with config.json (either backend), and a
    checkpoint without a tokenizer: exit 1 with one line naming the file and the key."""
    import shutil

    from safetensors.numpy import load_file, save_file

    _, dirs, texts, _ = trajectory

    def attempt(ck, *extra):
        capsys.readouterr()
        rc = main(["trajectory", "--checkpoints", str(ck), "--texts", str(texts), "--run-dir",
                   str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"), "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1, err
        return err

    unknown = tmp_path / "step1-unknown"
    shutil.copytree(dirs[0], unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_moe"}))
    for backend in ("auto", "torch", "jax"):
        err = attempt(unknown, "--backend", backend)
        assert "config.json" in err and "'no_such_moe'" in err, err

    for backend in ("jax", "torch"):
        for name, edit in (("missing", lambda w: w.pop("model.layers.1.mlp.gate.weight")),
                           ("misshaped", lambda w: w.update({"model.norm.weight": np.ones(3, np.float32)})),
                           ("extra",
                            lambda w: w.update({"model.layers.0.mlp.surprise.weight": np.ones(2, np.float32)}))):
            bad = tmp_path / f"step2-{backend}-{name}"
            shutil.copytree(dirs[0], bad)
            weights = load_file(bad / "model.safetensors")
            edit(weights)
            save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
            err = attempt(bad, "--backend", backend)
            key = {"missing": "model.layers.1.mlp.gate.weight", "misshaped": "model.norm.weight",
                   "extra": "model.layers.0.mlp.surprise.weight"}[name]
            assert str(bad) in err and key in err, (backend, name, err)

    no_tok = tmp_path / "step3-notok"
    shutil.copytree(dirs[0], no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    err = attempt(no_tok, "--backend", "jax")
    assert str(no_tok) in err and "--tokenizer" in err, err
