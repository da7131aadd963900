"""Forward throughput: moegrok's MoeLM (jit, every expert implementation) vs Hugging Face `OlmoeForCausalLM` (torch,
eager, no grad) on the same config, weights and batch, on this machine's CPU.

    python benchmarks/bench_model.py [--layers 4 --d 256 --experts 8 --topk 2 --batch 8 --seq 256 --repeats 5]

Prints tokens/s for each and the ratio ours/HF (best of our implementations), the max logit difference as a
sanity check that both computed the same thing, and the load average: on a shared machine, torch's OpenMP threads
lose far more to competing processes than XLA's, so only quiet-machine ratios compare the implementations.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def best_times(fns: dict, repeats: int) -> dict:
    """Min wall time of each function, measured in interleaved rounds so that load from other processes on a
    shared machine hits every contender alike."""
    for fn in fns.values():
        fn()  # warm-up: jit compile, torch allocator
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def forward_gflop(layers, d, heads, inter, experts, topk, vocab, batch, seq) -> float:
    """Useful FLOPs of one forward (2 per multiply-add): q/k/v/o projections, causal attention (half the T x T
    scores and the weighted sum), router, the top-k experts' SwiGLU, the LM head. Elementwise work is ignored."""
    n = batch * seq
    attn = 2 * n * d * 4 * d + 2 * 2 * batch * heads * seq * seq * (d // heads) / 2
    moe = 2 * n * d * experts + 2 * n * topk * 3 * d * inter
    return (layers * (attn + moe) + 2 * n * d * vocab) / 1e9


def gemm_peak_gflops(n: int = 1024, repeats: int = 10) -> dict:
    """This machine's fp32 GEMM throughput ([2n, n] @ [n, n], best of `repeats`) for XLA and torch at their
    default threads: the ceiling any forward made of GEMMs can approach."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.RandomState(0).rand(2 * n, n).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.tensor(a)
    mm = jax.jit(lambda x: x @ x[:n].T)
    t = best_times({"xla": lambda: mm(ja).block_until_ready(), "torch": lambda: ta @ ta[:n].T}, repeats)
    return {k: 2 * 2 * n * n * n / v / 1e9 for k, v in t.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--inter", type=int, default=512, help="per-expert intermediate size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import OlmoeForCausalLM

    from moegrok.families import hf_config_object

    from moegrok.convert.hf import load_olmoe
    from moegrok.model.config import MOE_IMPLS, MoeConfig

    cfg = MoeConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.inter,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, num_experts=args.experts,
                    num_experts_per_tok=args.topk, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = OlmoeForCausalLM(hf_config_object(cfg)).eval()
    with tempfile.TemporaryDirectory() as tmp:  # same weights on both sides, through the converter
        hf.save_pretrained(tmp)
        ours = load_olmoe(tmp, dtype="float32")

    ids = np.random.RandomState(0).randint(0, args.vocab, size=(args.batch, args.seq))
    ids_t, ids_j = torch.tensor(ids), jnp.asarray(ids)
    n_tok = args.batch * args.seq

    graphdef, state = nnx.split(ours)

    def make_fwd(impl):
        @jax.jit
        def fwd(state, tokens):
            return nnx.merge(graphdef, state)(tokens, moe_impl=impl).logits
        return lambda: fwd(state, ids_j).block_until_ready()

    def hf_fwd():
        with torch.no_grad():
            return hf(ids_t).logits

    fns = {"HF OlmoeForCausalLM": hf_fwd, **{f"moegrok {impl}": make_fwd(impl) for impl in MOE_IMPLS}}
    ref = hf_fwd().numpy()
    diff = {impl: float(np.abs(np.asarray(fns[f"moegrok {impl}"]()) - ref).max()) for impl in MOE_IMPLS}
    t = best_times(fns, args.repeats)
    t_hf = t.pop("HF OlmoeForCausalLM")

    print(f"config: {args.layers} layers, d={args.d}, {args.heads} heads, {args.experts} experts top-{args.topk}, "
          f"expert hidden {args.inter}, vocab {args.vocab}; batch {args.batch}x{args.seq} = {n_tok} tokens; "
          f"fp32; torch threads {torch.get_num_threads()}, jax devices {jax.devices()}, cpus {os.cpu_count()}")
    print(f"{'impl':<22}{'s/forward':>12}{'tokens/s':>12}{'vs HF':>8}")
    print(f"{'HF OlmoeForCausalLM':<22}{t_hf:>12.4f}{n_tok / t_hf:>12.0f}{1.0:>8.2f}")
    for name, ti in t.items():
        print(f"{name:<22}{ti:>12.4f}{n_tok / ti:>12.0f}{t_hf / ti:>8.2f}")
    print(f"best moegrok / HF throughput ratio: {t_hf / min(t.values()):.2f}x   (max |logit diff| vs HF: "
          + ", ".join(f"{impl} {d:.1e}" for impl, d in diff.items()) + ")")
    gf = forward_gflop(args.layers, args.d, args.heads, args.inter, args.experts, args.topk, args.vocab,
                       args.batch, args.seq)
    peak = gemm_peak_gflops()
    print(f"useful work {gf:.1f} GFLOP per forward: HF achieves {gf / t_hf:.0f} GFLOP/s, best moegrok "
          f"{gf / min(t.values()):.0f} GFLOP/s; this machine's fp32 GEMM peak (2048x1024x1024): XLA "
          f"{peak['xla']:.0f}, torch {peak['torch']:.0f} GFLOP/s -> no implementation can exceed "
          f"{max(peak.values()) / (gf / t_hf):.2f}x HF here")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
