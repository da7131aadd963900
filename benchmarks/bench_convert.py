"""Peak memory and time of `load_olmoe` on a >= 1 GB bf16 OLMoE-shaped checkpoint (per-expert keys, written by
`save_olmoe` into a temporary directory), next to `transformers.OlmoeForCausalLM.from_pretrained` on the same files.

    python benchmarks/bench_convert.py [--layers 6 --d 1024 --inter 512 --experts 64]

Each load runs in a fresh subprocess that reports its own peak RSS and its RSS after imports from
/proc/self/status (VmHWM, VmRSS: per address space, so unlike ru_maxrss not inherited from the parent that
generated the checkpoint). Target: peak RSS <= 1.3x the checkpoint size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEM = r"""
def mem_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
"""

CHILD_OURS = MEM + r"""
import json, sys, time
from moegrok.convert.hf import load_olmoe
import jax.numpy as jnp  # jax's runtime is part of any use of the model: count it in the baseline
jnp.zeros(1).block_until_ready()
base = mem_kib("VmRSS")
t0 = time.perf_counter()
model = load_olmoe(sys.argv[1])
model.embed[...].block_until_ready()
dt = time.perf_counter() - t0
print(json.dumps({"base_kib": base, "peak_kib": mem_kib("VmHWM"), "seconds": dt,
                  "dtype": model.cfg.param_dtype}))
"""

CHILD_HF = MEM + r"""
import json, sys, time
import torch
from transformers import OlmoeForCausalLM
base = mem_kib("VmRSS")
t0 = time.perf_counter()
model = OlmoeForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
dt = time.perf_counter() - t0
print(json.dumps({"base_kib": base, "peak_kib": mem_kib("VmHWM"), "seconds": dt,
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def run_child(code: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference load")
    args = ap.parse_args(argv)

    from moegrok.convert.hf import save_olmoe
    from moegrok.model.config import MoeConfig
    from moegrok.model.model import MoeLM

    cfg = MoeConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.inter,
                    num_hidden_layers=args.layers, num_attention_heads=args.d // 128, num_experts=args.experts,
                    num_experts_per_tok=args.topk, dtype="bfloat16", param_dtype="bfloat16")
    with tempfile.TemporaryDirectory(dir=Path(tempfile.gettempdir())) as tmp:
        path = Path(tmp) / "olmoe"
        model = MoeLM(cfg, seed=0)
        t0 = time.perf_counter()
        save_olmoe(model, path)
        t_save = time.perf_counter() - t0
        del model
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        n_tensors = len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) \
            if (path / "model.safetensors.index.json").exists() else None
        rows = {"moegrok load_olmoe": run_child(CHILD_OURS, path)}
        if not args.no_hf:
            rows["HF from_pretrained"] = run_child(CHILD_HF, path)

    gb = size / 1e9
    print(f"checkpoint: {args.layers} layers, d={args.d}, {args.experts} experts x {args.inter}, vocab {args.vocab}, "
          f"bf16, per-expert keys; {size / 2**30:.2f} GiB in safetensors ({gb:.2f} GB)"
          + (f", {n_tensors} tensors" if n_tensors else ""))
    print(f"save_olmoe: {t_save:.1f} s ({gb / t_save:.2f} GB/s)")
    print(f"{'loader':<22}{'peak RSS GiB':>14}{'/ ckpt':>8}{'after-import GiB':>18}{'(peak-base)/ckpt':>18}"
          f"{'seconds':>9}")
    for name, r in rows.items():
        peak, base = r["peak_kib"] * 1024, r["base_kib"] * 1024
        print(f"{name:<22}{peak / 2**30:>14.2f}{peak / size:>8.2f}{base / 2**30:>18.2f}"
              f"{(peak - base) / size:>18.2f}{r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
