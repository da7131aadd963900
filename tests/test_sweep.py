"""train/sweep.py: the run plan (names, overrides, forks after parents), and a tiny sweep end to end — trained,
analysed, skipped when re-run, and turned into the metrics-study table by analysis/metrics_study.py --sweep."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "train" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_is_variants_times_knobs_times_seeds_then_forks():
    sweep = _sweep_module()
    import argparse

    args = argparse.Namespace(out="runs/x", seeds=[0, 1], variant=["a:", "e8:model.num_experts=8"],
                              knob=["train.weight_decay=1,2"], fork=["a-weight_decay1_s0@60:train.weight_decay=5"])
    runs = sweep.plan(args)
    names = [n for n, _ in runs]
    assert names == ["a-weight_decay1_s0", "a-weight_decay1_s1", "a-weight_decay2_s0", "a-weight_decay2_s1",
                     "e8-weight_decay1_s0", "e8-weight_decay1_s1", "e8-weight_decay2_s0", "e8-weight_decay2_s1",
                     "a-weight_decay1_s0-f60-weight_decay5"]
    ov = dict(runs)
    assert ov["e8-weight_decay2_s1"] == ["model.num_experts=8", "train.weight_decay=2", "data.seed=1", "train.seed=1"]
    fork = ov["a-weight_decay1_s0-f60-weight_decay5"]
    assert fork[-2:] == ["--fork", str(Path("runs/x") / "a-weight_decay1_s0") + "@60"]
    assert fork.index("train.weight_decay=5") > fork.index("train.weight_decay=1")  # the fork's value wins
    args.variant, args.knob, args.fork = [], ["train.weight_decay=3.0"], []
    assert [n for n, _ in sweep.plan(args)] == ["weight_decay3.0_s0", "weight_decay3.0_s1"]


def test_tiny_sweep_trains_analyses_resumes_and_tabulates(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train" / "sweep.py"), str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
           "--seeds", "0", "1", "--variant", "small:data.num_steps=40", "--analyze", "--mesh-data", "1",
           "train.num_checkpoints=4"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for s in (0, 1):
        assert (out / f"small_s{s}" / "analysis" / "summary.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("[skip]") == 2 and "[analyze]" not in again.stdout
    study = tmp_path / "study.md"
    r = subprocess.run([sys.executable, str(ROOT / "analysis" / "metrics_study.py"), "--sweep", str(out),
                        "--domains", "math", "knowledge", "math_twin", "--control", "math_twin", "--out", str(study)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = study.read_text()
    assert "### small" in text and "| math | pathway distance (text) |" in text
