"""The synthetic study on a tiny configuration (seconds): its numbers against independent NumPy recomputation, the
dual-space linearised GD against parameter-space GD, the network approaching the kernel predictor with width, and
the files and CLI."""
from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest

from moegrok.cli import main
from moegrok.errors import MoegrokError
from moegrok.theory.ntk import init_relu_experts
from moegrok.theory.synthetic import (SyntheticConfig, linearised_gd, make_task, routing, run_synthetic,
                                      train_run)
from moegrok.theory.synthetic_report import write_synthetic

TINY = SyntheticConfig(n=24, n_test=20, dim=6, num_experts=4, num_clusters=2, width=16, alphas=(0.0, 1.0),
                       temperatures=(1.0, 0.1), seeds=3, train_seeds=1, train_widths=(8, 32),
                       train_routings=((1.0, 0.1),), train_steps=400, chunk_size=16)


@pytest.fixture(scope="module")
def tiny_result():
    return run_synthetic(TINY)


def _relu_K(W, a, X, X2):
    m = a.shape[0]
    p1, p2 = X @ W.T, X2 @ W.T
    return (np.maximum(p1, 0) @ np.maximum(p2, 0).T + ((p1 > 0) * a ** 2) @ (p2 > 0).T * (X @ X2.T)) / m


def _ref_pathway_distance(g, tau):
    """τ rule + text encoding + normalised Levenshtein written out independently (rapidfuzz for the distance)."""
    from rapidfuzz.distance import Levenshtein

    strs = []
    for row in g:
        order = sorted(range(len(row)), key=lambda k: (-row[k], k))
        kept, s = [], 0.0
        for k in order:
            kept.append(k)
            s += row[k]
            if s >= tau:
                break
        strs.append(",".join(map(str, kept)))
    d = [Levenshtein.distance(a, b) / max(len(a), len(b)) for i, a in enumerate(strs) for b in strs[i + 1:]]
    return float(np.mean(d))


def test_sweep_row_matches_numpy_reference(tiny_result):
    row = next(r for r in tiny_result.sweep if r["seed"] == 1 and r["alpha"] == 1.0 and r["temperature"] == 0.1)
    task = make_task(TINY, 1)
    ex = init_relu_experts(np.random.default_rng([1, 1]), TINY.num_experts, TINY.width, TINY.dim)
    g, gt = routing(task, 1.0, 0.1)
    n = TINY.n
    H = sum(np.outer(g[:, k], g[:, k]) * _relu_K(ex.W[k], ex.a[k], task.X_NxD, task.X_NxD)
            for k in range(TINY.num_experts))
    Ht = sum(np.outer(gt[:, k], g[:, k]) * _relu_K(ex.W[k], ex.a[k], task.Xt_MxD, task.X_NxD)
             for k in range(TINY.num_experts))
    mu = np.linalg.eigvalsh(H)
    lam = TINY.lam
    assert row["d_eff_norm"] == pytest.approx(np.sum(mu / (mu + lam)) / n, rel=1e-8)
    alpha = np.linalg.solve(H + lam * np.eye(n), task.y_N)
    assert row["excess_in_sample"] == pytest.approx(np.mean((H @ alpha - task.f_N) ** 2), rel=1e-7)
    assert row["excess_held_out"] == pytest.approx(np.mean((Ht @ alpha - task.ft_M) ** 2), rel=1e-7)
    v = np.linalg.solve(H + lam * np.eye(n), task.y_N)
    assert row["bound_bias"] == pytest.approx(lam ** 2 / n * v @ v, rel=1e-7)
    s2 = TINY.noise_std ** 2
    assert row["bound_total"] == pytest.approx(row["bound_bias"] + s2 * row["d_eff_norm"]
                                               + s2 * math.log(1 / TINY.delta) / n, rel=1e-10)
    assert row["path_dist_text"] == pytest.approx(_ref_pathway_distance(g, TINY.tau), rel=1e-12)


def test_sweep_shape_and_no_nan(tiny_result):
    assert len(tiny_result.sweep) == TINY.seeds * len(TINY.alphas) * len(TINY.temperatures)
    for r in tiny_result.sweep + tiny_result.training:
        for k, v in r.items():
            assert not (isinstance(v, float) and not math.isfinite(v)), (k, r)
    assert all(0 <= r["d_eff_norm"] <= 1 for r in tiny_result.sweep)


def _numpy_nesterov_param_space(J, y, lam, lr, beta, steps):
    """Parameter-space GD with Nesterov momentum (optax's form) on ½‖Jδ − y‖² + ½λ‖δ‖²; returns Jδ_t per step."""
    delta, v, out = np.zeros(J.shape[1]), np.zeros(J.shape[1]), []
    for _ in range(steps):
        grad = J.T @ (J @ delta - y) + lam * delta
        v = grad + beta * v
        delta = delta - lr * (grad + beta * v)
        out.append(J @ delta)
    return np.array(out)


def test_dual_linearised_gd_equals_parameter_space_gd():
    rng = np.random.default_rng(0)
    J, y = rng.standard_normal((5, 12)), rng.standard_normal(5)
    H = J @ J.T
    lr = 1.0 / (np.linalg.eigvalsh(H).max() + 0.1)
    cs = linearised_gd(H, y, 0.1, lr, 50, 0.9)
    np.testing.assert_allclose(cs @ H, _numpy_nesterov_param_space(J, y, 0.1, lr, 0.9, 50), rtol=1e-9, atol=1e-12)


def test_network_approaches_kernel_predictor_with_width():
    cfg = dataclasses.replace(TINY, train_steps=600)
    task = make_task(cfg, 0)
    gaps = {w: np.mean([train_run(cfg, s, w, 1.0, 0.3, task)["gap_net_vs_krr_held_out"] for s in (0, 1)])
            for w in (8, 512)}
    assert gaps[512] < 0.5 * gaps[8]


def test_files_and_cli(tmp_path, tiny_result, capsys):
    summary = write_synthetic(tiny_result, TINY, tmp_path)
    for name in ("synthetic_sweep.csv", "synthetic_correlations.csv", "bound_violations.csv",
                 "synthetic_training.csv", "width_gap.csv", "fig_synthetic_scatter.png", "fig_bound.png",
                 "fig_width_gap.png", "theory.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "theory.md").read_text()
    assert "C1 = 1, C2 = 1" in text
    for name in ("synthetic_sweep.csv", "synthetic_correlations.csv", "bound_violations.csv"):
        body = (tmp_path / name).read_text().lower()
        assert "nan" not in body.replace("n/a", "")
    with open(tmp_path / "synthetic_correlations.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["scope"] == "all runs" and int(rows[0]["n"]) == len(tiny_result.sweep)
    violations = sum(r[f"excess_{w}"] > r["bound_total"] for r in tiny_result.sweep
                     for w in ("in_sample", "held_out"))
    violations += sum(r[f"excess_{p}_{w}"] > r["bound_total"] for r in tiny_result.training
                      for p in ("net", "krr") for w in ("in_sample", "held_out"))
    assert summary["violations"] == violations

    out = tmp_path / "cli"
    rc = main(["theory", "synthetic", "--out", str(out), "--seeds", "2", "--train-seeds", "0", "--n", "10",
               "--n-test", "5", "--width", "8", "--alphas", "0,1", "--temperatures", "1", "--quiet"])
    assert rc == 0 and (out / "theory.md").exists()
    assert "bound violations" in capsys.readouterr().out


def test_bad_config_is_a_clear_error():
    with pytest.raises(MoegrokError, match="widths must be even"):
        run_synthetic(dataclasses.replace(TINY, width=7))
    assert main(["theory", "synthetic", "--out", "/tmp/unused-theory", "--seeds", "0", "--quiet"]) == 1
