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
Settings are timed in `--rounds` interleaved rounds (median step time per round; reported: the median over
rounds and their range) and the ratios are taken round by round, so a drift of the machine's speed hits both sides.
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
    ap.add_argument("--iters", type=int, default=40, help="our steps timed per setting, over all rounds")
    ap.add_argument("--hf-iters", type=int, default=20, help="HF steps timed per setting, over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
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

    from moegrok.families import hf_config_object

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

    # Every setting is timed in each of --rounds interleaved rounds (this VM's speed drifts by +-20% from minute to
    # minute; interleaving exposes ours and HF to the same drift), and ratios are taken round by round.
    settings = {}  # name -> (prepare, step)
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

            def run(step=step, carry=carry, t_j=t_j, m_j=m_j):
                carry[0], carry[1], m = step(carry[0], carry[1], t_j, m_j)
                m["loss"].block_until_ready()

            settings[f"moegrok[{impl}, {nd} device{'s' if nd > 1 else ''}]"] = (lambda: None, run)

    hf_cfg = hf_config_object(cfg)
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

    for n in (int(t) for t in args.torch_threads.split(",")):
        settings[f"transformers[torch {n} thr]"] = (lambda n=n: torch.set_num_threads(n), run_hf)

    per_round = {name: [] for name in settings}
    for name, (prepare, fn) in settings.items():  # compile / warm up
        prepare()
        for _ in range(3):
            fn()
    for _ in range(args.rounds):
        for name, (prepare, fn) in settings.items():
            prepare()
            iters = args.iters if name.startswith("moegrok") else args.hf_iters
            per_round[name].append(bench(fn, 1, max(1, iters // args.rounds)))
    med = {name: float(np.median(v)) for name, v in per_round.items()}
    for name, v in per_round.items():
        print(f"{name:32s} train step {med[name] * 1e3:8.2f} ms  {ntok / med[name]:10.0f} tok/s  "
              f"(rounds {min(v) * 1e3:.1f}-{max(v) * 1e3:.1f} ms)", flush=True)
    ours_names = [n for n in med if n.startswith("moegrok")]
    hf_names = [n for n in med if not n.startswith("moegrok")]
    best_impl = min(ours_names, key=med.get)
    ours = med[best_impl]
    for n in hf_names:
        r = np.array(per_round[n]) / np.array(per_round[best_impl])
        print(f"ratio (ours/HF tokens/s, {best_impl} vs {n}): median over rounds {np.median(r):.2f}x "
              f"(rounds {r.min():.2f}-{r.max():.2f}x)")
    # HF's best setting per round (its faster thread count can change with the load).
    r = np.min([per_round[n] for n in hf_names], axis=0) / np.array(per_round[best_impl])
    print(f"ratio vs HF's best setting in each round: median {np.median(r):.2f}x (rounds {r.min():.2f}-{r.max():.2f}x)")
    print(f"load average after timing: {loadavg()}")

    # Routing-record share: one probe record per checkpoint vs the steps between checkpoints.
    cfg = cfg.replace(moe_impl=best_impl.split("[")[1].split(",")[0])
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
