"""Device benchmark: one script for one H100/H200 (about 8 minutes), or `--dry-run` (tiny shapes, CPU, seconds; the
test suite runs it so it cannot rot).

    python benchmarks/device/run.py --out benchmarks/device/result.json     # on the GPU machine
    python benchmarks/device/run.py --dry-run --out /tmp/dry.json           # anywhere

Prints and writes JSON with:
  (a) the expert path alone at OLMoE-1B-7B layer shapes (16k tokens, d 2048, 64 experts top-8, expert width 1024,
      bf16): dense / blocked / lax.ragged_dot / tokamax (when installed), forward and forward + backward, with the
      useful FLOP rate (2 x tokens x k x 3 x d x width per forward) and the speed-up over lax.ragged_dot;
  (b) train-step tokens/s and MFU for configs/gpu.yaml's model (bf16) and for a 2-layer model at OLMoE-1B-7B shapes
      (MFU = model FLOPs per step as `moegrok plan` counts them / step time / the chip's peak bf16 FLOP/s);
  (c) routing-capture tokens/s (`moegrok olmoe`'s forward) at OLMoE-1B-7B shapes, random weights, bf16, 16 layers.
Only JAX, Flax, Optax and moegrok are needed; tokamax is optional. For an offline GPU machine, download its wheels
here first (`bash benchmarks/device/fetch_wheels.sh`), carry `benchmarks/device/wheels`, and run there
`pip install --no-index --find-links benchmarks/device/wheels tokamax && python benchmarks/device/run.py --out R.json`.
"""
from __future__ import annotations

import argparse
import json
import platform as host_platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "cpu": None}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def timed(fn, *args, reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn(*args)` over `reps` calls, after `warmup` (compilation) calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_paths(N, D, E, k, I, dtype, reps) -> dict:
    from moegrok.model.moe import EXPERT_IMPLS, route, tokamax_available

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, D)), dtype)
    gu = jnp.asarray(rng.standard_normal((E, D, 2 * I)) * D ** -0.5, dtype)
    dn = jnp.asarray(rng.standard_normal((E, I, D)) * I ** -0.5, dtype)
    r = jnp.asarray(rng.standard_normal((D, E)), jnp.float32)
    _, topw, topi = route(x.astype(jnp.float32) @ r, k, False)
    topw = topw.astype(dtype)
    names = ["dense", "blocked", "ragged_dot"] + (["tokamax"] if tokamax_available() else [])
    useful = 2 * N * k * 3 * D * I
    out = {"shape": {"tokens": N, "d_model": D, "experts": E, "top_k": k, "expert_width": I, "dtype": str(dtype)},
           "useful_flops_forward": useful}
    for name in names:
        f = EXPERT_IMPLS[name]
        fwd = jax.jit(lambda x, gu, dn, f=f: f(x, gu, dn, topw, topi))
        bwd = jax.jit(jax.grad(lambda x, gu, dn, f=f: jnp.sum(f(x, gu, dn, topw, topi).astype(jnp.float32)),
                               argnums=(0, 1, 2)))
        try:
            tf, tb = timed(fwd, x, gu, dn, reps=reps), timed(bwd, x, gu, dn, reps=reps)
        except Exception as e:  # noqa: BLE001 - report a path that does not run here, keep measuring the others
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        out[name] = {"forward_ms": tf * 1e3, "forward_backward_ms": tb * 1e3,
                     "forward_tflops": useful / tf / 1e12, "forward_backward_tflops": 3 * useful / tb / 1e12}
        print(f"  experts {name:10s} fwd {tf * 1e3:8.2f} ms ({useful / tf / 1e12:6.1f} TFLOP/s)   "
              f"fwd+bwd {tb * 1e3:8.2f} ms ({3 * useful / tb / 1e12:6.1f} TFLOP/s)", flush=True)
    base = out.get("ragged_dot", {})
    for name in names:
        if "forward_ms" in out.get(name, {}) and "forward_ms" in base:
            out[name]["speedup_vs_ragged_dot"] = {"forward": base["forward_ms"] / out[name]["forward_ms"],
                                                  "forward_backward": base["forward_backward_ms"]
                                                  / out[name]["forward_backward_ms"]}
    return out


def train_step(model_cfg, rows, T, reps, label) -> dict:
    from flax import nnx

    from moegrok.model.model import MoeLM
    from moegrok.plan import flops_per_token
    from moegrok.training.config import TrainConfig
    from moegrok.training.optim import make_optimizer
    from moegrok.training.train import make_train_step

    model = MoeLM(model_cfg, seed=0)
    graphdef, state = nnx.split(model)
    tx = make_optimizer(TrainConfig(), 1000)
    opt_state = tx.init(state)
    step = make_train_step(graphdef, tx, model_cfg, None)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(2, model_cfg.vocab_size, (rows, T)), jnp.int32)
    mask = jnp.ones((rows, T), bool)
    carry = [state, opt_state]

    def one():
        carry[0], carry[1], m = step(carry[0], carry[1], tokens, mask)
        return m["loss"]

    t = timed(lambda: one(), reps=reps, warmup=2)
    flops = flops_per_token(model_cfg, T) * rows * T
    peak = peak_flops()
    res = {"tokens_per_step": rows * T, "step_ms": t * 1e3, "tokens_per_s": rows * T / t,
           "model_tflops": flops / t / 1e12, "mfu": flops / t / peak if peak else None,
           "moe_impl": model_cfg.moe_impl, "attention_impl": model_cfg.attention_impl, "dtype": model_cfg.dtype}
    print(f"  train {label}: {res['step_ms']:.1f} ms/step, {res['tokens_per_s']:,.0f} tokens/s, "
          f"{res['model_tflops']:.1f} TFLOP/s" + (f", MFU {res['mfu']:.1%}" if peak else ""), flush=True)
    return res


def capture(model_cfg, rows, T, reps) -> dict:
    from moegrok.model.model import MoeLM
    from moegrok.probe import _probe_batch

    model = MoeLM(model_cfg, seed=0)
    rng = np.random.default_rng(2)
    tokens = np.asarray(rng.integers(2, model_cfg.vocab_size, (rows, T)), np.int32)
    mask = np.ones((rows, T), bool)
    t = timed(lambda: _probe_batch(model, tokens, mask, mask), reps=reps, warmup=1)
    res = {"tokens_per_batch": rows * T, "batch_ms": t * 1e3, "tokens_per_s": rows * T / t}
    print(f"  capture: {res['batch_ms']:.1f} ms/batch, {res['tokens_per_s']:,.0f} tokens/s", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 repetition: checks the script, not speed")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "device" / "result.json"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--skip", nargs="*", default=[], choices=["experts", "train", "capture"])
    args = p.parse_args(argv)
    from moegrok.config_values import load_yaml
    from moegrok.model.config import MoeConfig, olmoe_1b_7b

    dry = args.dry_run
    reps = 1 if dry else args.reps
    dev = jax.devices()[0]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": dev.device_kind, "platform": dev.platform,
              "host": host_platform.node(), "jax": jax.__version__, "dry_run": dry, "peak_bf16_flops": peak_flops()}
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    bf16 = "bfloat16"
    if "experts" not in args.skip:
        shape = (256, 32, 8, 2, 16) if dry else (16384, 2048, 64, 8, 1024)
        result["experts"] = expert_paths(*shape, jnp.bfloat16, reps)
    if "train" not in args.skip:
        gpu_model = load_yaml((ROOT / "configs" / "gpu.yaml").read_text())["model"]
        gpu_model.update(dtype=bf16)
        if dry:
            gpu_model.update(num_hidden_layers=2, num_experts=8, hidden_size=32, intermediate_size=16,
                             num_attention_heads=2)
        result["train_gpu_yaml"] = train_step(MoeConfig(**gpu_model), 4 if dry else 64, 32 if dry else 256, reps,
                                              "configs/gpu.yaml model")
        olmoe2 = olmoe_1b_7b(num_hidden_layers=2, dtype=bf16, eos_token_id=None)
        if dry:
            olmoe2 = MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_experts=8, num_experts_per_tok=2, dtype=bf16,
                               eos_token_id=None)
        result["train_olmoe_2_layers"] = train_step(olmoe2, 4 if dry else 8, 32 if dry else 2048, reps,
                                                    "2-layer OLMoE-1B-7B shapes")
    if "capture" not in args.skip:
        full = olmoe_1b_7b(dtype=bf16, param_dtype=bf16, eos_token_id=None)
        if dry:
            full = MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_experts=8, num_experts_per_tok=2, dtype=bf16,
                             param_dtype=bf16, eos_token_id=None)
        result["capture_olmoe_1b_7b"] = capture(full, 4 if dry else 16, 32 if dry else 2048, reps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
