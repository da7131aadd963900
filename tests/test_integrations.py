"""The monitor inside other people's training loops: transformers' Trainer with `MoegrokCallback` (records equal the
JAX backend on the saved checkpoints, live indicators in the Trainer's log, training untouched), a plain PyTorch MoE
with `RoutingMonitor` (records against a NumPy forward of the same weights), and two processes under torchrun."""
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

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORDS = "the a cat dog sat ran on mat rug one two three four five plus equals is".split()
PROBES = [{"id": i, "domain": d, "text": t} for i, (d, t) in enumerate([
    ("math", "one plus two equals three"), ("math", "two plus two equals four"), ("math", "one plus one is two"),
    ("words", "the cat sat on the mat"), ("words", "a dog ran on the rug"), ("words", "the dog sat")])]
TRAIN_TEXTS = [f"{a} plus {b} equals {c}" for a, b, c in [("one", "two", "three"), ("two", "two", "four"),
                                                          ("one", "three", "four"), ("two", "three", "five")]] + \
    ["the cat sat on the mat", "a dog ran on the rug", "the dog sat on a mat", "a cat ran"]
STEPS, SAVE_EVERY = 60, 20


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok):
        self.rows = [tok(t)["input_ids"] for t in TRAIN_TEXTS]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


TRAINER_SCRIPT = r'''
import json, sys
import torch, transformers
sys.path.insert(0, sys.argv[3])
from test_integrations import Texts, tokenizer, PROBES, STEPS, SAVE_EVERY
from moegrok.integrations.transformers import MoegrokCallback

out, run_dir = sys.argv[1], sys.argv[2]
tok = tokenizer()
torch.manual_seed(0)
model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
    vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
    pad_token_id=0, max_position_embeddings=64))
args = transformers.TrainingArguments(
    output_dir=out, max_steps=STEPS, save_steps=SAVE_EVERY, logging_steps=1, per_device_train_batch_size=4 // int(
    sys.argv[5]), learning_rate=3e-3, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    dataloader_num_workers=0, save_only_model=True, ddp_backend="gloo" if int(sys.argv[5]) > 1 else None)
callbacks = [MoegrokCallback(run_dir, PROBES)] if sys.argv[4] == "1" else []
trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts(tok), processing_class=tok,
                               data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
                               callbacks=callbacks)
trainer.train()
if trainer.is_world_process_zero():
    with open(out + "/history.json", "w") as f:
        json.dump(trainer.state.log_history, f)
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(tmp_path: Path, name: str, callback: bool, procs: int = 1) -> tuple[Path, Path, list]:
    out, run_dir = tmp_path / f"{name}_out", tmp_path / f"{name}_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = tmp_path / "train_script.py"
    script.write_text(TRAINER_SCRIPT)
    args = [str(script), str(out), str(run_dir), str(Path(__file__).parent), "1" if callback else "0", str(procs)]
    cmd = [sys.executable, *args] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
         str(free_port()), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, run_dir, json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    with_cb = run_trainer(tmp, "with", callback=True)
    without = run_trainer(tmp, "without", callback=False)
    return tmp, with_cb, without


def test_trainer_callback_records_equal_the_jax_backend(trained, tmp_path):
    tmp, (out, run_dir, history), (_, _, plain_history) = trained
    # Training is untouched by the probe: the same losses, bitwise.
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    assert losses == [(h["step"], h["loss"]) for h in plain_history if "loss" in h] and len(losses) == STEPS
    # The live indicators reached the Trainer's log (and with it every report_to integration).
    live = [h for h in history if any(k.startswith("moegrok/") for k in h)]
    assert [h["step"] for h in live] == [20, 40, 60]
    assert {"moegrok/path_text/math", "moegrok/train_loss/words", "moegrok/norm_router/all"} <= set(live[0])

    rd = RunDir(run_dir)
    assert rd.steps == [20, 40, 60] and rd.finished and rd.run_meta.producer == "hf_trainer"
    assert (rd.run_meta.model_type, rd.run_meta.router, rd.run_meta.num_layers) == ("qwen3_moe", "softmax", 2)
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    texts = tmp_path / "probes.jsonl"
    texts.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    ref_dir = tmp_path / "jax"
    assert main(["trajectory", "--checkpoints", *map(str, ckpts), "--texts", str(texts), "--run-dir", str(ref_dir),
                 "--backend", "jax", "--no-progress"]) == 0
    ref = RunDir(ref_dir)
    assert ref.steps == rd.steps
    for step in rd.steps:
        a, b = rd.probe(step), ref.probe(step)
        np.testing.assert_allclose(a.route_probs, b.route_probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.sample_loss, b.sample_loss, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    # The run directory is a run directory: the analysis and the indicator benchmark read it.
    assert main(["analyze", str(run_dir), "--no-progress", "--no-figures"]) == 0
    assert main(["indicators", str(run_dir), "--out", str(tmp_path / "ind"), "--no-figures", "--no-progress"]) == 0
    import csv

    offline = {(int(r["step"]), f"moegrok/{r['indicator']}/{r['domain']}"): float(r["value"])
               for r in csv.DictReader(open(tmp_path / "ind" / "series.csv")) if r["value"] != "n/a"}
    for h in live:  # what was logged live is what the run directory gives afterwards
        for key, value in h.items():
            if key.startswith("moegrok/"):
                assert offline[(h["step"], key)] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_two_processes_write_one_run_directory(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo DDP): rank 0 alone writes; its records equal one process's capture of the
    same checkpoints (the torch backend, here in this process)."""
    out, run_dir, history = run_trainer(tmp_path, "ddp", callback=True, procs=2)
    rd = RunDir(run_dir)
    assert rd.steps == [20, 40, 60] and rd.finished
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "indicators" in r] == [20, 40, 60]  # written once, not once per rank
    texts = tmp_path / "probes.jsonl"
    texts.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert main(["trajectory", "--checkpoints", *map(str, ckpts), "--texts", str(texts), "--run-dir",
                 str(tmp_path / "one"), "--backend", "torch", "--no-progress"]) == 0
    ref = RunDir(tmp_path / "one")
    for step in rd.steps:
        np.testing.assert_allclose(rd.probe(step).route_probs, ref.probe(step).route_probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(rd.probe(step).sample_loss, ref.probe(step).sample_loss, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(rd.probe(step).topk_ids, ref.probe(step).topk_ids)


# ----------------------------------------------------------------------------------------------- plain PyTorch
class TinyMoE(torch.nn.Module):
    """A plain PyTorch MoE language model: embedding, then per layer h += sum_k w_k expert_k(h) (softmax top-2)."""

    def __init__(self, vocab=20, d=16, experts=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.routers = torch.nn.ModuleList(torch.nn.Linear(d, experts, bias=False) for _ in range(layers))
        self.experts = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(experts))
                                           for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for router, experts in zip(self.routers, self.experts):
            w, idx = torch.softmax(router(h), -1).topk(2, dim=-1)
            out = torch.stack([e(h) for e in experts], -2)  # [B, T, E, d]
            h = h + (torch.gather(out, -2, idx[..., None].expand(*idx.shape, h.shape[-1])) * w[..., None]).sum(-2)
        return self.head(h)


def test_plain_loop_monitor_matches_a_numpy_forward(tmp_path):
    from moegrok.integrations.monitor import RoutingMonitor

    torch.manual_seed(0)
    model = TinyMoE()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probes = [{"id": i, "domain": "ab"[i % 2], "text": " ".join(str(3 + (i * j) % 15) for j in range(2 + i))}
              for i in range(6)]
    tok = lambda text: [int(w) for w in text.split()]  # noqa: E731  (any callable text -> ids)
    with RoutingMonitor(model, tmp_path / "run", probes, tok, routers=list(model.routers), top_k=2,
                        forward=lambda m, ids, mask: m(ids), total_steps=30) as mon:
        for step in range(1, 31):
            x = torch.randint(3, 20, (8, 6))
            loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 20), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(step, {"loss": loss.item()})
            if step % 10 == 0:
                live = mon.record(step)
                assert "moegrok/consistency_s/a" in live or "moegrok/train_loss/a" in live
    rd = RunDir(tmp_path / "run")
    assert rd.steps == [10, 20, 30] and rd.finished and len(rd.metrics()) == 30
    # Reference for the last checkpoint: the same weights, forward in NumPy, one probe at a time.
    W = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    rec = rd.probe(30)
    for n, p in enumerate(probes):
        ids = np.array(tok(p["text"]))
        h = W["embed.weight"][ids]
        for layer in range(2):
            logits = h @ W[f"routers.{layer}.weight"].T
            g = np.exp(logits - logits.max(-1, keepdims=True))
            g /= g.sum(-1, keepdims=True)
            np.testing.assert_allclose(rec.route_probs[n, layer], g.mean(0), atol=1e-5)
            top = np.argsort(-g, axis=-1, kind="stable")[:, :2]
            np.testing.assert_array_equal(rec.topk_ids[n, :len(ids), layer], top)
            outs = np.stack([h @ W[f"experts.{layer}.{e}.weight"].T + W[f"experts.{layer}.{e}.bias"]
                             for e in range(4)], -2)
            h = h + (np.take_along_axis(outs, top[..., None], -2) * np.take_along_axis(g, top, -1)[..., None]).sum(-2)
        logits = h @ W["head.weight"].T + W["head.bias"]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
            logits.max(-1, keepdims=True)
        nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
        np.testing.assert_allclose(rec.sample_loss[n], nll, atol=1e-5)
