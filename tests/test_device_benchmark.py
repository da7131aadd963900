"""The device benchmark's dry run (tiny shapes, CPU): the script a GPU session runs cannot rot unnoticed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "run.py"


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "dry.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    for name in ("dense", "blocked", "ragged_dot"):
        e = res["experts"][name]
        assert e["forward_ms"] > 0 and e["forward_backward_ms"] > 0, e
        assert e["speedup_vs_ragged_dot"]["forward"] > 0
    for key in ("train_gpu_yaml", "train_olmoe_2_layers"):
        t = res[key]
        assert t["tokens_per_s"] > 0 and t["model_tflops"] > 0 and t["dtype"] == "bfloat16"
    assert res["capture_olmoe_1b_7b"]["tokens_per_s"] > 0
