"""The two capture backends of `moegrok trajectory` (`--backend jax|torch`) on the same checkpoint and batch, per JAX
family (olmoe, mixtral, qwen2_moe, qwen3_moe, glm4_moe), at OLMoE-like layer shapes.

    python benchmarks/bench_backends.py [--families olmoe,mixtral,qwen2_moe,qwen3_moe,glm4_moe] [--layers 2]
                                        [--vocab 4096] [--batch 16 --seq 128] [--repeats 5] [--save-dtype bfloat16]
                                        [--cpu-devices N]

Per family, one random checkpoint is built with the family's own transformers class (`<Family>ForCausalLM(config)`,
torch's default init, seed 0) and written with `save_pretrained` into a temporary directory, which is deleted before
the next family. Layer shapes are OLMoE-1B-7B's: hidden 2048, 64 routed experts x 1024 (SwiGLU), top-8, head_dim
128; only the depth (--layers MoE layers, all MoE) and the vocabulary (--vocab) are small, so one checkpoint of each
family fits a 2-core box. Family switches on, as their real checkpoints have them:

- olmoe: 16/16 heads, full-width QK-norm, top-k not renormalised.
- mixtral: 16/4 heads (GQA), renormalised top-k.
- qwen2_moe: 16/16 heads, q/k/v biases, a sigmoid-gated shared expert of 1024.
- qwen3_moe: 32/4 heads of head_dim 128 (Qwen3-30B-A3B's attention: q width 4096 != hidden), per-head QK-norm,
  renormalised top-k.
- glm4_moe: 16/8 heads, q/k/v biases, partial rotary 0.5, sigmoid router with n_group 8 / topk_group 4, a random
  `e_score_correction_bias` (N(0, 0.05), so it changes choices), routed_scaling_factor 2.5, one shared expert of
  1024.

Both backends load the checkpoint the way `moegrok trajectory` does (`trajectory.jax_backend().load` = `load_hf`,
`trajectory.torch_backend().load` = `torch_capture.load_model`) with dtype float32, and are timed on exactly the call
the trajectory loop makes per length bucket: `probe_record(model, tokens, mask, ids, domains, batch_size)` on one
batch (--batch rows x --seq tokens, random ids, about half the rows right-padded to 60-100 % of --seq). JAX runs on
--cpu-devices XLA CPU devices (default: as the CLI, the number of cores, at most 8). Torch runs at 1 and at 2
threads (torch's OpenMP spin-waits collapse when other processes load the box, so both are reported). Warm-up (one
call each; JAX's includes tracing and XLA compilation) is timed and reported separately; then --repeats interleaved
rounds (jax, torch@1, torch@2). Printed per family: best and median ms per batch, real (non-padding) tokens/s, the
speed-up of jax over the faster torch setting, and a sanity line: max |route_probs| and |sample_loss| differences
and the share of real tokens whose top-k ids agree exactly (order included) and as sets. `os.getloadavg()` is printed
before each family.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")
D, INTER, EXPERTS, TOPK, HEAD_DIM = 2048, 1024, 64, 8, 128


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------- checkpoints
def family_config(fam: str, layers: int, vocab: int):
    """(transformers config, model class) for `fam` at OLMoE-like layer shapes."""
    import transformers as tf

    common = {"vocab_size": vocab, "hidden_size": D, "num_hidden_layers": layers, "max_position_embeddings": 4096,
              "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None, "tie_word_embeddings": False,
              "num_experts_per_tok": TOPK, "rms_norm_eps": 1e-6}
    if fam == "olmoe":
        return tf.OlmoeConfig(intermediate_size=INTER, num_experts=EXPERTS, num_attention_heads=16,
                              num_key_value_heads=16, norm_topk_prob=False, **common), tf.OlmoeForCausalLM
    if fam == "mixtral":
        return tf.MixtralConfig(intermediate_size=INTER, num_local_experts=EXPERTS, num_attention_heads=16,
                                num_key_value_heads=4, **common), tf.MixtralForCausalLM
    if fam == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=INTER, moe_intermediate_size=INTER,
                                 shared_expert_intermediate_size=INTER, num_experts=EXPERTS, num_attention_heads=16,
                                 num_key_value_heads=16, qkv_bias=True, norm_topk_prob=False, **common), \
            tf.Qwen2MoeForCausalLM
    if fam == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=INTER, moe_intermediate_size=INTER, num_experts=EXPERTS,
                                 num_attention_heads=32, num_key_value_heads=4, head_dim=HEAD_DIM,
                                 norm_topk_prob=True, **common), tf.Qwen3MoeForCausalLM
    if fam == "glm4_moe":
        return tf.Glm4MoeConfig(intermediate_size=INTER, moe_intermediate_size=INTER, n_routed_experts=EXPERTS,
                                n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                                first_k_dense_replace=0, norm_topk_prob=True, num_attention_heads=16,
                                num_key_value_heads=8, head_dim=HEAD_DIM, attention_bias=True, use_qk_norm=False,
                                **common), tf.Glm4MoeForCausalLM
    raise SystemExit(f"unknown family {fam!r}; choose from {FAMILIES}")


def build_checkpoint(fam: str, path: Path, layers: int, vocab: int, save_dtype: str) -> str:
    """A random checkpoint of `fam` saved with `save_pretrained`; returns a one-line description."""
    import torch

    cfg, cls = family_config(fam, layers, vocab)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    model.to(getattr(torch, save_dtype)).save_pretrained(str(path))
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    heads = f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads"
    return f"{n / 1e6:.0f} M params, {heads}, {size / 2**30:.2f} GiB of {save_dtype} safetensors"


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """Random ids; about half the rows right-padded to 60-100 % of `seq` (row 0 always full)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, vocab, size=(batch, seq)).astype(np.int32)
    lengths = np.where(rng.rand(batch) < 0.5, rng.randint(int(0.6 * seq), seq + 1, size=batch), seq)
    lengths[0] = seq
    mask = np.arange(seq)[None, :] < lengths[:, None]
    tokens[~mask] = 0
    return tokens, mask


# ------------------------------------------------------------------------------------------------- timing
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def sanity(r_jax: dict, r_torch: dict, mask: np.ndarray) -> str:
    d_route = float(np.abs(r_jax["route_probs"] - r_torch["route_probs"]).max())
    d_loss = float(np.abs(r_jax["sample_loss"] - r_torch["sample_loss"]).max())
    a, b = r_jax["topk_ids"][mask], r_torch["topk_ids"][mask]  # [tokens, L, k]
    exact = float((a == b).all(-1).mean())
    as_set = float((np.sort(a, -1) == np.sort(b, -1)).all(-1).mean())
    return (f"max |route_probs diff| {d_route:.1e}, max |sample_loss diff| {d_loss:.1e}; topk ids agree on "
            f"{100 * exact:.2f} % of (token, layer) pairs in order, {100 * as_set:.2f} % as sets")


def bench_family(fam: str, args, tokens: np.ndarray, mask: np.ndarray) -> dict:
    import torch

    from moegrok.trajectory import jax_backend, torch_backend

    jb, tb = jax_backend(), torch_backend()
    ids, domains = list(range(len(tokens))), ["d"] * len(tokens)
    with tempfile.TemporaryDirectory(prefix=f"bench_backends_{fam}_") as tmp:
        t_build, desc = timed(lambda: build_checkpoint(fam, Path(tmp), args.layers, args.vocab, args.save_dtype))
        t_jload, jmodel = timed(lambda: jb.load(Path(tmp), "float32", False))
        torch.set_num_threads(2)
        t_tload, tmodel = timed(lambda: tb.load(Path(tmp), "float32", False))

    def run_jax():
        return jb.probe_record(jmodel, tokens, mask, ids, domains, batch_size=len(tokens))

    def run_torch(threads):
        def fn():
            torch.set_num_threads(threads)
            return tb.probe_record(tmodel, tokens, mask, ids, domains, batch_size=len(tokens))
        return fn

    fns = {"jax": run_jax, "torch@1": run_torch(1), "torch@2": run_torch(2)}
    warm = {}
    outs = {}
    for name, fn in fns.items():
        warm[name], outs[name] = timed(fn)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    torch.set_num_threads(2)
    check = sanity(outs["jax"], outs["torch@2"], mask)
    return {"desc": desc, "build_s": t_build, "load_s": {"jax": t_jload, "torch": t_tload}, "warm": warm,
            "times": times, "check": check}


def report(fam: str, r: dict, n_real: int, la: str) -> None:
    times = r["times"]
    best = {n: min(v) for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"[{fam}] {r['desc']}; built+saved in {r['build_s']:.1f} s; load fp32: jax {r['load_s']['jax']:.1f} s, "
          f"torch {r['load_s']['torch']:.1f} s")
    print("    warm-up (first call, excluded): " + ", ".join(f"{n} {1e3 * s:.0f} ms" for n, s in r["warm"].items()))
    print(f"    {'':<10}{'best ms':>9}{'median ms':>11}{'tok/s best':>12}{'tok/s med':>11}")
    for n in times:
        print(f"    {n:<10}{1e3 * best[n]:>9.0f}{1e3 * med[n]:>11.0f}{n_real / best[n]:>12.0f}{n_real / med[n]:>11.0f}")
    tb = min(best["torch@1"], best["torch@2"])
    tm = min(med["torch@1"], med["torch@2"])
    per_round = np.minimum(times["torch@1"], times["torch@2"]) / np.array(times["jax"])
    print(f"    jax speed-up vs the faster torch: best {tb / best['jax']:.2f}x, median {tm / med['jax']:.2f}x, "
          f"round by round median {np.median(per_round):.2f}x (range {per_round.min():.2f}-{per_round.max():.2f}x)")
    print(f"    sanity (jax vs torch@2): {r['check']}")
    print(f"    load average before / after: {la} / {loadavg()}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--layers", type=int, default=2, help="MoE layers (all layers are MoE)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of the saved checkpoint (both backends compute in float32 either way)")
    ap.add_argument("--cpu-devices", type=int, default=min(os.cpu_count() or 1, 8),
                    help="XLA CPU devices for the jax backend (default as `moegrok trajectory`: cores, at most 8)")
    args = ap.parse_args(argv)
    fams = [f for f in args.families.split(",") if f]
    from moegrok.training.config import request_host_devices

    request_host_devices(args.cpu_devices)  # before anything starts JAX, as the CLI does
    import jax
    import torch

    tokens, mask = make_batch(args.batch, args.seq, args.vocab)
    n_real = int(mask.sum())
    print(f"capture backends: {len(fams)} families x {args.layers} MoE layers, d={D}, {EXPERTS} experts x {INTER} "
          f"top-{TOPK}, vocab {args.vocab}; batch {args.batch}x{args.seq} ({n_real} real tokens); fp32 compute; "
          f"{args.repeats} interleaved rounds after one warm-up call each; jax {jax.__version__} on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), torch {torch.__version__}, "
          f"cpus {os.cpu_count()}", flush=True)
    for fam in fams:
        la = loadavg()
        print(f"\nload average before {fam}: {la}", flush=True)
        report(fam, bench_family(fam, args, tokens, mask), n_real, la)
        gc.collect()  # both models die with bench_family's frame; free them before the next family's checkpoint


if __name__ == "__main__":
    main()
