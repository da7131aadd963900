"""Train-step throughput: moegrok (jit, AdamW via optax) vs transformers' OlmoeForCausalLM + torch AdamW, same
config, same batch, this machine; and the share of step time the probe (routing) record costs.

    python benchmarks/bench_train.py [--layers 4 --hidden 64 --experts 8 --topk 2 --batch 32 --seq 48]
                                     [--data-devices 1,2] [--impls dense,ragged,blocked]

Ours is `moegrok.training.train.make_train_step` itself (the trainer's jitted, donated step: loss + aux + z-loss,
clip-by-global-norm, masked AdamW), on one device and data parallel over `--data-devices` XLA CPU devices (what
`moegrok train ... train.mesh_data=N` runs; the ratio lines use our fastest setting). HF is `OlmoeForCausalLM(...).train()` with `output_router_logits=True` (so its
loss includes `router_aux_loss_coef` x load balancing; HF has no z-loss, ours adds it), `clip_grad_norm_(1.0)` and
`torch.optim.AdamW`, zero_grad / backward / step, at `--torch-threads` (default 2 = this box's cores; also 1, because
on a shared box torch's OpenMP threads spin against other processes and a 2-thread step can be 100x slower).
Times are medians over `--iters` steps after warm-up; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def bench(fn, warmup: int, iters: int) -> float:
    """Median seconds per call (robust to other jobs' bursts on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--inter", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--hf-iters", type=int, default=15)
    ap.add_argument("--torch-threads", default="2,1", help="comma-separated torch thread counts to time HF at")
    ap.add_argument("--impls", default="dense,ragged,blocked", help="our moe_impl values to time")
    ap.add_argument("--probe-n", type=int, default=256, help="probe-set size for the routing-record share")
    ap.add_argument("--steps-per-checkpoint", type=int, default=750)
    ap.add_argument("--data-devices", default="1,2",
                    help="comma-separated data-parallel device counts to time ours at (train.mesh_data); on CPU the "
                         "host is split into that many XLA devices, as `moegrok train` does")
    args = ap.parse_args()
    n_dev = [int(n) for n in args.data_devices.split(",")]
    if max(n_dev) > 1:  # before JAX initialises its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(n_dev)}").strip()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import OlmoeForCausalLM

    from moegrok.model.config import MoeConfig
    from moegrok.model.model import MoeLM
    from moegrok.probe import probe_record
    from moegrok.training.config import TrainConfig
    from moegrok.training.optim import make_optimizer
    from moegrok.training.train import make_mesh, make_train_step, shard_batch, shard_state

    rs = np.random.RandomState(0)
    tokens = rs.randint(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    ntok = args.batch * args.seq
    print(f"device: {jax.devices()[0].platform}, cpus {os.cpu_count()}, load average {loadavg()}")
    print(f"config: L={args.layers} d={args.hidden} I={args.inter} E={args.experts} k={args.topk} "
          f"V={args.vocab}; batch {args.batch}x{args.seq}")

    results = {}
    for impl in args.impls.split(","):
        # As configs/default.yaml: pad 0, no EOS (the default EOS id 50279 is outside a 128-token vocabulary).
        cfg = MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_experts=args.experts,
                        num_experts_per_tok=args.topk, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
                        pad_token_id=0, eos_token_id=None, moe_impl=impl)
        for nd in n_dev:
            tcfg = TrainConfig(learning_rate=1e-3, weight_decay=1.0, b1=0.9, b2=0.98, clip_norm=1.0,
                               warmup_steps=10, mesh_data=nd)
            mesh = make_mesh(tcfg)
            graphdef, state = nnx.split(MoeLM(cfg))
            tx = make_optimizer(tcfg, 1000)
            opt = tx.init(state)
            step = make_train_step(graphdef, tx, cfg, mesh)
            t_j, m_j = shard_batch(tokens, mesh), shard_batch(mask, mesh)
            carry = [shard_state(state, mesh), shard_state(opt, mesh)]

            def run():
                carry[0], carry[1], m = step(carry[0], carry[1], t_j, m_j)
                m["loss"].block_until_ready()

            name = f"{impl}, {nd} device{'s' if nd > 1 else ''}"
            results[name] = bench(run, 3, args.iters)
            print(f"moegrok[{name}]  train step {results[name] * 1e3:8.2f} ms  {ntok / results[name]:10.0f} tok/s"
                  f"  (load {loadavg()})", flush=True)
    best_impl = min(results, key=results.get)
    ours = results[best_impl]

    hf_cfg = cfg.to_hf_config()
    hf_cfg.output_router_logits = True
    torch.manual_seed(0)
    hf = OlmoeForCausalLM(hf_cfg).train()
    opt_t = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    tt = torch.tensor(tokens, dtype=torch.long)

    def run_hf():
        opt_t.zero_grad(set_to_none=True)
        out = hf(input_ids=tt, labels=tt, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_t.step()

    theirs = {}
    for n in (int(t) for t in args.torch_threads.split(",")):
        torch.set_num_threads(n)
        theirs[n] = bench(run_hf, 3, args.hf_iters)
        print(f"transformers[torch {n} thr] train step {theirs[n] * 1e3:8.2f} ms  {ntok / theirs[n]:10.0f} tok/s"
              f"  (load {loadavg()})", flush=True)
    for n, t in theirs.items():
        print(f"ratio (ours/HF tokens/s, moegrok[{best_impl}] vs HF at torch {n} thread(s)): {t / ours:.2f}x")
    best_n = min(theirs, key=theirs.get)
    print(f"ratio vs HF's best setting here (torch {best_n} thread(s)): {theirs[best_n] / ours:.2f}x")

    # Routing-record share: one probe record per checkpoint vs the steps between checkpoints.
    cfg = cfg.replace(moe_impl=best_impl.split(",")[0])
    model = MoeLM(cfg)
    ptok = rs.randint(0, args.vocab, (args.probe_n, args.seq)).astype(np.int32)
    pmask = np.ones_like(ptok, bool)
    ids, doms = np.arange(args.probe_n), ["d"] * args.probe_n
    t_probe = bench(lambda: probe_record(model, ptok, pmask, ids, doms, batch_size=128), 1, 3)
    share = t_probe / (t_probe + args.steps_per_checkpoint * ours)
    print(f"probe record ({args.probe_n} samples): {t_probe * 1e3:.1f} ms = {share * 100:.2f}% of the time between "
          f"checkpoints ({args.steps_per_checkpoint} steps)")
    print(f"load average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
