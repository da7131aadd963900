"""The `moegrok olmoe` trajectory pipeline: forward-with-routing-capture throughput vs Hugging Face, and the peak
memory of the whole pipeline on a >= 1 GB checkpoint (issue #7 acceptance).

    python benchmarks/bench_olmoe.py [--layers 4 --d 128 --experts 8 --topk 2 --vocab 1024 --batch 32 --seq 128]
                                     [--big-layers 6 --big-d 1024 --big-inter 512 --big-experts 64] [--skip-rss]

1. Throughput. A tiny random OLMoE checkpoint is built with `transformers.OlmoeConfig` + `OlmoeForCausalLM` and
   saved; moegrok loads it with `load_olmoe` and runs `moegrok.probe.probe_record` on one batch (exactly the call the
   pipeline makes per length bucket: per-sample NLL, token-mean router softmax per layer, per-token top-k, router
   weights). The reference is `OlmoeForCausalLM` under `torch.no_grad()` with `output_router_logits=True` and the
   same capture done in torch (per-sample mean NLL, token-mean router softmax per layer, per-token top-k), on the same
   weights and batch, at torch 1 and 2 threads (torch's OpenMP spin-waits collapse when other processes load the
   box, so both are reported). Timing rounds are interleaved; best and median of --repeats rounds are printed.
2. Peak RSS. A bf16 checkpoint of >= 1 GB is written by `save_olmoe` into a temporary directory, exposed as two
   trajectory checkpoints `step1000-tokens4B` and `step2000-tokens8B` (symlinked files), with a small byte-level BPE
   tokenizer and 16 probe texts; `moegrok olmoe` runs in a fresh subprocess that reports its own VmHWM from
   /proc/self/status (per address space, not inherited from this process). Run once with one checkpoint and once
   with both: one checkpoint resident at a time means the two peaks are about equal, not 2x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------ 1. throughput
def throughput(args) -> None:
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from moegrok.convert.hf import load_olmoe
    from moegrok.probe import probe_record

    hf_cfg = OlmoeConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_experts=args.experts,
                         num_experts_per_tok=args.topk, max_position_embeddings=max(args.seq, 512),
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = OlmoeForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_olmoe(tmp, dtype="float32")

    rng = np.random.RandomState(0)
    tokens = rng.randint(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    ids, domains = list(range(args.batch)), ["d"] * args.batch
    tok_t, mask_t = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    n_tok = args.batch * args.seq
    k = args.topk

    import moegrok.probe

    def ours_fn():
        return probe_record(ours, tokens, mask, ids, domains, batch_size=args.batch)

    def ours_one_device():  # the same call with the data-parallel split turned off
        real, moegrok.probe._data_mesh = moegrok.probe._data_mesh, lambda: None
        try:
            return ours_fn()
        finally:
            moegrok.probe._data_mesh = real

    def hf_capture():
        with torch.no_grad():
            out = hf(input_ids=tok_t, attention_mask=mask_t, output_router_logits=True, use_cache=False)
            logits = out.logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -torch.gather(logp, -1, tok_t[:, 1:, None])[..., 0]
            valid = (mask_t[:, 1:] * mask_t[:, :-1]).float()
            sample_loss = (nll * valid).sum(1) / valid.sum(1).clamp_min(1.0)
            B, T = tok_t.shape
            probs = torch.stack([torch.softmax(r.float().view(B, T, -1), dim=-1) for r in out.router_logits])
            m = mask_t.float()
            route = torch.einsum("lbte,bt->ble", probs, m) / m.sum(1).clamp_min(1.0)[:, None, None]
            topw, topi = torch.topk(probs, k, dim=-1)
            return {"sample_loss": sample_loss.numpy(), "route_probs": route.numpy(),
                    "topk_ids": topi.permute(1, 2, 0, 3).numpy(), "topk_weights": topw.permute(1, 2, 0, 3).numpy()}

    def hf_at(threads):
        def fn():
            torch.set_num_threads(threads)
            return hf_capture()
        return fn

    n_dev = jax.device_count()
    fns = {"moegrok probe_record": ours_fn, "HF torch 2 threads": hf_at(2), "HF torch 1 thread": hf_at(1)}
    if n_dev > 1:
        fns["moegrok, 1 device"] = ours_one_device
    # sanity: both sides computed the same capture (fp32 on both sides)
    r_ours, r_hf = ours_fn(), hf_at(2)()
    d_loss = float(np.abs(r_ours["sample_loss"] - r_hf["sample_loss"]).max())
    d_route = float(np.abs(r_ours["route_probs"] - r_hf["route_probs"]).max())
    if n_dev > 1:
        r_one = ours_one_device()
        d_dev = max(float(np.abs(r_ours[k] - r_one[k]).max()) for k in ("sample_loss", "route_probs"))
    for fn in fns.values():  # warm-up (jit compile, allocator); the sanity call above was the first
        fn()
    times = {name: [] for name in fns}
    la0 = loadavg()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    la1 = loadavg()
    torch.set_num_threads(2)

    print(f"[1] forward + routing capture: {args.layers} layers, d={args.d}, {args.heads} heads, {args.experts} "
          f"experts top-{args.topk}, expert hidden {args.inter}, vocab {args.vocab}; batch {args.batch}x{args.seq} "
          f"= {n_tok} tokens; fp32; {args.repeats} interleaved rounds after warm-up; jax {jax.__version__} "
          f"{jax.devices()[0].platform}, torch {torch.__version__}, cpus {os.cpu_count()}")
    print(f"    capture agrees: max |sample_loss diff| {d_loss:.1e}, max |route_probs diff| {d_route:.1e}")
    print(f"    ours on {n_dev} XLA CPU device(s) (`moegrok olmoe --cpu-devices {n_dev}`)" +
          (f"; vs ours on 1 device: max diff {d_dev:.1e}" if n_dev > 1 else ""))
    best = {n: min(v) for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in times.items()}
    o = "moegrok probe_record"
    print(f"    {'':<22}{'best s':>9}{'median s':>10}{'tok/s best':>12}{'tok/s med':>11}{'ours/this best':>16}"
          f"{'ours/this med':>15}")
    for n in fns:
        print(f"    {n:<22}{best[n]:>9.4f}{med[n]:>10.4f}{n_tok / best[n]:>12.0f}{n_tok / med[n]:>11.0f}"
              f"{best[n] / best[o]:>16.2f}{med[n] / med[o]:>15.2f}")
    hf_best = min(best["HF torch 2 threads"], best["HF torch 1 thread"])
    hf_med = min(med["HF torch 2 threads"], med["HF torch 1 thread"])
    print(f"    ours / HF (HF at its best thread count): best {hf_best / best[o]:.2f}x, median "
          f"{hf_med / med[o]:.2f}x (target >= 1.5x)")
    per_round = np.minimum(times["HF torch 2 threads"], times["HF torch 1 thread"]) / np.array(times[o])
    q1, q2, q3 = np.percentile(per_round, [25, 50, 75])
    print(f"    ours / HF round by round (same round, HF's faster thread count): median {q2:.2f}x, "
          f"quartiles {q1:.2f}-{q3:.2f}x")
    print(f"    load average before / after timing: {la0} / {la1}")


# ------------------------------------------------------------------------------------------------ 2. peak RSS
CHILD = r"""
import json, sys
from moegrok.cli import main
rc = main(sys.argv[1:])
st = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}
print("BENCH " + json.dumps({"rc": rc, "peak_kib": st["VmHWM"], "rss_kib": st["VmRSS"]}))
"""

CHILD_LOAD = r"""
import json, sys
from moegrok.convert.hf import load_olmoe
model = load_olmoe(sys.argv[1])
model.embed[...].block_until_ready()
st = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}
print("BENCH " + json.dumps({"rc": 0, "peak_kib": st["VmHWM"], "rss_kib": st["VmRSS"]}))
"""

WORDS = ("the model routes each token to a few experts and the router learns which expert handles numbers code "
         "prose or dialogue while training continues across many checkpoints of a long trajectory").split()


def make_texts(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.RandomState(seed)
    doms = ["code", "math", "prose", "chat"]
    return [{"id": i, "domain": doms[i % 4],
             "text": " ".join(rng.choice(WORDS, size=int(rng.randint(20, 60))))} for i in range(n)]


def make_tokenizer(path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>").save_pretrained(str(path))


def run_pipeline(cks: list[Path], texts: Path, tok: Path, run_dir: Path, load_only: bool = False) -> dict:
    cmd = [sys.executable, "-c", CHILD_LOAD, str(cks[0])] if load_only else \
        [sys.executable, "-c", CHILD, "olmoe", "--checkpoints", *map(str, cks), "--texts", str(texts),
         "--run-dir", str(run_dir), "--tokenizer", str(tok), "--no-progress"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    lines = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"pipeline failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1][6:])
    r["seconds"] = dt
    r["records"] = sorted(p.name for p in (run_dir / "records").glob("*")) if (run_dir / "records").is_dir() else []
    return r


def peak_rss(args) -> None:
    from moegrok.convert.hf import save_olmoe
    from moegrok.model.config import MoeConfig
    from moegrok.model.model import MoeLM

    cfg = MoeConfig(vocab_size=args.big_vocab, hidden_size=args.big_d, intermediate_size=args.big_inter,
                    num_hidden_layers=args.big_layers, num_attention_heads=args.big_d // 128,
                    num_experts=args.big_experts, num_experts_per_tok=args.big_topk, dtype="bfloat16",
                    param_dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "olmoe"
        t0 = time.perf_counter()
        model = MoeLM(cfg, seed=0)
        save_olmoe(model, src)
        del model
        t_gen = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        cks = []
        for name in ("step1000-tokens4B", "step2000-tokens8B"):  # same weights, files symlinked (no extra disk)
            d = tmp / name
            d.mkdir()
            for f in src.iterdir():
                (d / f.name).symlink_to(f)
            cks.append(d)
        rows = make_texts(args.texts)
        texts = tmp / "texts.jsonl"
        texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = tmp / "tokenizer"
        make_tokenizer(tok, [r["text"] for r in rows])
        load = run_pipeline(cks[:1], texts, tok, tmp / "run0", load_only=True)
        one = run_pipeline(cks[:1], texts, tok, tmp / "run1")
        two = run_pipeline(cks, texts, tok, tmp / "run2")
    print(f"[2] pipeline peak RSS: checkpoint {args.big_layers} layers, d={args.big_d}, {args.big_experts} experts x "
          f"{args.big_inter}, top-{args.big_topk}, vocab {args.big_vocab}, bf16, {size / 2**30:.2f} GiB "
          f"({size / 1e9:.2f} GB) of safetensors (generated in {t_gen:.1f} s); {args.texts} probe texts, "
          f"byte-level BPE tokenizer")
    print(f"    {'run':<30}{'peak RSS GiB':>13}{'/ ckpt':>8}{'seconds':>9}  records")
    for name, r in (("load_olmoe only (reference)", load), ("1 checkpoint (step1000)", one),
                    ("2 checkpoints (step1000+2000)", two)):
        print(f"    {name:<30}{r['peak_kib'] * 1024 / 2**30:>13.2f}{r['peak_kib'] * 1024 / size:>8.2f}"
              f"{r['seconds']:>9.1f}  {', '.join(r['records'])}")
    ratio = two["peak_kib"] / one["peak_kib"]
    print(f"    peak(2 checkpoints) / peak(1 checkpoint) = {ratio:.2f} "
          f"({'one checkpoint resident at a time' if ratio < 1.3 else 'NOT one-at-a-time: peaks grow with count'})")
    print(f"    load average after: {loadavg()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--inter", type=int, default=256, help="per-expert intermediate size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--big-layers", type=int, default=6)
    ap.add_argument("--big-d", type=int, default=1024)
    ap.add_argument("--big-inter", type=int, default=512)
    ap.add_argument("--big-experts", type=int, default=64)
    ap.add_argument("--big-topk", type=int, default=8)
    ap.add_argument("--big-vocab", type=int, default=50304)
    ap.add_argument("--texts", type=int, default=16, help="probe texts for the peak-RSS run")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--cpu-devices", type=int, default=min(os.cpu_count() or 1, 8),
                    help="XLA CPU devices for ours, as `moegrok olmoe --cpu-devices` (default: as the CLI); ours is "
                         "also timed on one device; the RSS runs use the CLI's default")
    args = ap.parse_args(argv)
    if args.cpu_devices > 1:  # before JAX initialises its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    print(f"load average at start: {loadavg()}")
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_rss:
        peak_rss(args)


if __name__ == "__main__":
    main()
