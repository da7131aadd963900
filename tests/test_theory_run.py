"""`moegrok theory run` on small hand-made run directories written with moegrok.rundir.write_record / write_meta:
d_eff per checkpoint against NumPy recomputation, degenerate records, errors, CLI and files."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from moegrok.cli import main
from moegrok.errors import MoegrokError
from moegrok.rundir import write_meta, write_record
from moegrok.theory.fromrun import RunTheoryConfig, run_theory_rows
from moegrok.theory.run_report import run_theory, write_run

L, E, D, T, K = 2, 4, 3, 5, 2


def _probe(route_probs, domains, rng):
    N = route_probs.shape[0]
    ids = np.argsort(-route_probs, axis=-1)[:, None, :, :K].repeat(T, axis=1)
    return {
        "sample_ids": np.arange(N)[::-1].copy(),  # reversed on purpose: rows are grouped by sample id
        "domains": np.asarray(domains),
        "sample_loss": rng.random(N),
        "route_probs": route_probs.astype(np.float32),
        "router_weights": rng.standard_normal((L, E, D)).astype(np.float32),
        "topk_ids": ids.astype(np.int32),
        "topk_weights": np.full((N, T, L, K), 0.5, np.float32),
        "token_mask": np.ones((N, T), bool),
        "tokens": np.zeros((N, T), np.int32),
    }


def _eval(acc):
    return {"val_loss": {d: 1.0 + a for d, a in acc.items()},
            "test": {d: {"accuracy": a, "ids": [0, 1], "correct": [1, int(a > 0.5)]} for d, a in acc.items()}}


def _make_run(path, steps=4, N=8, sharpen=True, domains=None, probs=None):
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    write_meta(path, producer="test", num_layers=L, num_experts=E, top_k=K, d_model=D, domains=["a", "b"],
               finished=True)
    domains = domains or ["a", "b"] * (N // 2)
    base = rng.dirichlet(np.ones(E), size=(N, L))
    for s in range(steps):
        if probs is not None:
            p = probs
        else:
            z = np.log(base) * (1 + 2 * s if sharpen else 1)
            p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        write_record(path, 100 * (s + 1), _probe(p, domains, rng), _eval({"a": 0.1 * s + 0.05 * (s % 2), "b": 0.2 * s}))
    return path


def _ref_deff(H, lam):
    mu = np.clip(np.linalg.eigvalsh(H), 0, None)
    return float(np.sum(mu / (mu + lam)))


def test_d_eff_per_checkpoint_matches_numpy(tmp_path):
    run = _make_run(tmp_path / "run")
    rows = run_theory_rows(run, RunTheoryConfig(layer=-1, lam_rel=0.1))
    from moegrok.rundir import RunDir

    rd = RunDir(run)
    assert {r["step"] for r in rows} == set(rd.steps)
    for r in rows:
        probe = rd.probe(r["step"])
        keep = np.ones(len(probe.domains), bool) if r["group"] == "all" else probe.domains == r["group"]
        g = probe.route_probs[keep, L - 1].astype(np.float64)
        Hc = g @ g.T
        assert r["d_eff_constant"] == pytest.approx(_ref_deff(Hc, 0.1 * np.trace(Hc) / len(g)), rel=1e-8)
        Z = g @ probe.router_weights[L - 1].astype(np.float64)
        He = Hc * (Z @ Z.T)
        assert r["d_eff_embedding"] == pytest.approx(_ref_deff(He, 0.1 * np.trace(He) / len(g)), rel=1e-7)
        assert r["n"] == keep.sum()
    acc_a = [r["accuracy"] for r in rows if r["group"] == "a"]
    assert acc_a == pytest.approx([0.0, 0.15, 0.2, 0.35])


def test_absolute_lambda_and_layer_choice(tmp_path):
    run = _make_run(tmp_path / "run", steps=1)
    (r,) = [r for r in run_theory_rows(run, RunTheoryConfig(layer=0, lam=0.05)) if r["group"] == "all"]
    from moegrok.rundir import RunDir

    g = RunDir(run).probe(100).route_probs[:, 0].astype(np.float64)
    assert r["layer"] == 0 and r["lam_constant"] == 0.05
    assert r["d_eff_constant"] == pytest.approx(_ref_deff(g @ g.T, 0.05), rel=1e-8)
    # λ = 0 on the singular routing Gram (rank <= E < n) gives its rank, not a failed inverse
    (r0,) = [r for r in run_theory_rows(run, RunTheoryConfig(layer=0, lam=0.0)) if r["group"] == "all"]
    assert r0["d_eff_constant"] == pytest.approx(np.linalg.matrix_rank(g))


def test_degenerate_identical_routing_and_single_samples(tmp_path):
    N = 4
    p = np.tile(np.array([0.7, 0.1, 0.1, 0.1]), (N, L, 1))  # every sample routed identically
    run = _make_run(tmp_path / "run", steps=3, N=N, probs=p, domains=["a", "a", "a", "b"])
    out = tmp_path / "out"
    rows = run_theory_rows(run, RunTheoryConfig())
    write_run(rows, RunTheoryConfig(), run, out)
    r_all = next(r for r in rows if r["group"] == "all")
    mu = N * float(np.sum(p[0, 0] ** 2))  # H = c·11ᵀ, one eigenvalue n·‖g‖²; relative λ = 0.1·‖g‖²
    lam = 0.1 * float(np.sum(p[0, 0] ** 2))
    assert r_all["d_eff_constant"] == pytest.approx(mu / (mu + lam), rel=1e-5)
    assert r_all["path_dist"] == 0.0
    r_b = next(r for r in rows if r["group"] == "b")
    assert r_b["n"] == 1 and r_b["path_dist"] == "n/a" and math.isfinite(r_b["d_eff_constant"])
    for name in ("run_kernel.csv", "run_correlations.csv", "theory.md"):
        body = (out / name).read_text().lower()
        assert "nan" not in body.replace("n/a", "")
    with open(out / "run_correlations.csv") as f:
        corr = list(csv.DictReader(f))
    assert all(c["pearson_r"] == "n/a" and c["note"].startswith("n/a") for c in corr)  # constant series


def test_correlations_against_scipy(tmp_path):
    import scipy.stats

    run = _make_run(tmp_path / "run", steps=5)
    rows = run_theory_rows(run, RunTheoryConfig())
    from moegrok.theory.run_report import correlation_rows

    corr = correlation_rows(rows)
    a = sorted((r for r in rows if r["group"] == "a"), key=lambda r: r["step"])
    x = [r["d_eff_constant_norm"] for r in a]
    y = [r["accuracy"] for r in a]
    c = next(c for c in corr if c["group"] == "a" and c["x"] == "d_eff_constant_norm" and c["y"] == "accuracy"
             and c["kind"] == "raw")
    assert c["n"] == 5
    assert c["pearson_r"] == pytest.approx(scipy.stats.pearsonr(x, y).statistic)
    assert c["spearman_p"] == pytest.approx(scipy.stats.spearmanr(x, y).pvalue)
    d = next(c for c in corr if c["group"] == "a" and c["x"] == "d_eff_constant_norm" and c["y"] == "accuracy"
             and c["kind"] == "first differences")
    assert d["n"] == 4 and d["pearson_r"] == pytest.approx(scipy.stats.pearsonr(np.diff(x), np.diff(y)).statistic)


def test_bad_records_are_clear_errors(tmp_path):
    rng = np.random.default_rng(1)
    run = tmp_path / "bad"
    run.mkdir()
    write_meta(run, producer="test", num_layers=L, num_experts=E, top_k=K, d_model=D, domains=["a"])
    p = np.full((3, L, E), 0.5)  # rows sum to 2
    write_record(run, 10, _probe(p, ["a"] * 3, rng), _eval({"a": 0.5}))
    with pytest.raises(MoegrokError, match="route_probs"):
        run_theory_rows(run, RunTheoryConfig())
    good = _make_run(tmp_path / "good", steps=1)
    with pytest.raises(MoegrokError, match="out of range"):
        run_theory_rows(good, RunTheoryConfig(layer=5))
    empty = tmp_path / "empty"
    empty.mkdir()
    write_meta(empty, producer="test")
    with pytest.raises(MoegrokError, match="no complete checkpoint records"):
        run_theory_rows(empty, RunTheoryConfig())
    assert main(["theory", "run", str(empty), "--quiet"]) == 1


def test_cli_default_out_dir(tmp_path, capsys):
    run = _make_run(tmp_path / "run", steps=3)
    assert main(["theory", "run", str(run), "--quiet"]) == 0
    out = run / "theory"
    for name in ("run_kernel.csv", "run_correlations.csv", "theory.md", "fig_run_all.png", "fig_run_a.png"):
        assert (out / name).stat().st_size > 0, name
    assert "constant" in (out / "theory.md").read_text()
    assert "wrote" in capsys.readouterr().out
    # the study pipeline's entry point writes the same files into a chosen directory
    res = run_theory(run, tmp_path / "elsewhere", RunTheoryConfig(encoding="expert"))
    assert res["rows"] == 9 and (tmp_path / "elsewhere" / "theory.md").exists()
    assert "](fig_run_all.png)" in (tmp_path / "elsewhere" / "theory.md").read_text()


@pytest.mark.parametrize("key, value", [("lam", "-1.0"), ("lam_rel", "-0.5"), ("tau", "1.5"), ("encoding", "dna")])
def test_theory_and_run_refuse_the_same_values(tmp_path, capsys, key, value):
    """The rule lives in RunTheoryConfig: `moegrok theory run --KEY` and `theory: {KEY: ...}` through `moegrok run`
    give the same message, and the study stops before training anything."""
    import json
    from pathlib import Path

    from moegrok.cli import main

    run = tmp_path / "empty"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"format": "moegrok-run/1", "finished": False}))
    assert main(["theory", "run", str(run), f"--{key.replace('_', '-')}", value]) == 1
    flag_err = capsys.readouterr().err
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "study"), f"theory.{key}={value}"]) == 1
    run_err = capsys.readouterr().err
    assert f"theory.{key} (--{key.replace('_', '-')}) must" in flag_err
    assert flag_err.split("error: ")[1] == run_err.split("error: ")[1]
    assert not (tmp_path / "study").exists()
