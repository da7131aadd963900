"""The metrics-study tables: values traced back to each run's own correlations.csv / lag.csv."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moegrok.analysis.multirun import correlation_summary, lag_rows, load_analysis, markdown, target_reached
from moegrok.cli import main
from synthetic_run import SynthSpec, make_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multi")
    out = {}
    for label, seeds in (("a", (0, 1)), ("b", (2,))):
        out[label] = []
        for s in seeds:
            run = make_run(base / f"{label}{s}", SynthSpec(seed=s, domains=("math", "knowledge", "math_twin")))
            assert main(["analyze", str(run), "--embedding", "tfidf", "--no-progress", "--no-figures"]) == 0
            out[label].append(run)
    return out


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_correlation_summary_matches_each_run(runs):
    loaded = {k: [load_analysis(r) for r in v] for k, v in runs.items()}
    rows = correlation_summary(loaded, ["math", "knowledge"])
    for label, dirs in runs.items():
        for metric in ("training loss (domain)", "consistency S", "pathway distance (text)"):
            per = [next(r for r in _csv(d / "analysis" / "correlations.csv")
                        if (r["domain"], r["window"], r["metric"], r["kind"]) == ("math", "all", metric, "diff"))
                   for d in dirs]
            rs = [float(r["pearson_r"]) for r in per if r["pearson_r"]]
            got = next(r for r in rows if (r["config"], r["domain"], r["metric"], r["kind"]) == (label, "math", metric,
                                                                                                "diff"))
            assert got["seeds"] == len(rs)
            if rs:
                assert got["r_mean"] == pytest.approx(np.mean(rs)) and got["r_min"] == pytest.approx(min(rs))
                assert got["sig"] == sum(float(r["pearson_p_adj"]) < 0.05 for r in per if r["pearson_r"])
                ctl = [float(r["control_pearson_r"]) for r in per if r["control_pearson_r"]]
                assert got["control_r_mean"] == pytest.approx(np.mean(ctl))  # the in-run math_twin control


def test_lag_rows_and_target(runs):
    loaded = {k: [load_analysis(r) for r in v] for k, v in runs.items()}
    lag = lag_rows(loaded, ["math", "knowledge"])
    for row in lag:
        d = runs[row["config"]][[p.name for p in runs[row["config"]]].index(row["run"])]
        lags = [int(r["lag_checkpoints"]) for r in _csv(d / "analysis" / "lag.csv") if r["domain"] == row["domain"]]
        assert row["pairs"] == len(lags) and row["ok"] == any(x >= 2 for x in lags)
    corr = correlation_summary(loaded, ["math", "knowledge"])
    # Hand-made: every math metric of config "a" with r in [+0.9 (min), -0.9 (max)] is read as distance <= -0.9
    # (its max) and consistency >= +0.9 (its min), significant in both seeds.
    fake = [dict(c, seeds=2, sig=2, r_min=0.9, r_max=-0.9) if c["config"] == "a" and c["domain"] == "math"
            else c for c in corr]
    assert "math" in target_reached(fake)["a"]
    weak = [dict(c, r_min=0.7) if c["metric"] == "consistency S" else c for c in fake]
    assert "math" not in target_reached(weak)["a"]
    bad = [dict(c, sig=1) if c["config"] == "a" else c for c in fake]  # one seed not significant
    assert "math" not in target_reached(bad)["a"]


def test_markdown_and_script(runs, tmp_path):
    loaded = {k: [load_analysis(r) for r in v] for k, v in runs.items()}
    text = markdown(loaded, ["math", "knowledge", "math_twin"], ["math_twin"])
    assert "### a" in text and "### b" in text and "longest lag" in text
    out = tmp_path / "study.md"
    groups = [f"{k}={','.join(map(str, v))}" for k, v in runs.items()]
    r = subprocess.run([sys.executable, str(ROOT / "analysis" / "metrics_study.py"), *sum([["--group", g] for g in groups], []),
                        "--domains", "math", "knowledge", "math_twin", "--control", "math_twin", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == text
    r = subprocess.run([sys.executable, str(ROOT / "analysis" / "metrics_study.py"), "--group",
                        f"x={tmp_path / 'nope'}", "--domains", "math"], capture_output=True, text=True)
    assert r.returncode == 1 and "summary.json: missing" in r.stderr


def test_complexity_mirrors_consistency(runs):
    """The table omits C because C = 1 - S per sample: its correlations are S's negated, with the same n and p."""
    checked = 0
    for dirs in runs.values():
        for d in dirs:
            rows = _csv(d / "analysis" / "correlations.csv")
            key = lambda r: (r["domain"], r["window"], r["kind"])  # noqa: E731
            s = {key(r): r for r in rows if r["metric"] == "consistency S"}
            c = {key(r): r for r in rows if r["metric"] == "complexity C"}
            assert s.keys() == c.keys()
            for k in s:
                assert s[k]["n"] == c[k]["n"] and bool(s[k]["pearson_r"]) == bool(c[k]["pearson_r"])
                if s[k]["pearson_r"]:
                    assert float(c[k]["pearson_r"]) == pytest.approx(-float(s[k]["pearson_r"]), abs=1e-5)
                    assert float(c[k]["pearson_p"]) == pytest.approx(float(s[k]["pearson_p"]), rel=1e-4, abs=1e-9)
                    checked += 1
    assert checked > 0


def test_a_metric_added_through_the_registry_reaches_every_table(tmp_path, monkeypatch):
    """One `register_metric` call: the toy's value is in metrics.csv (checked against NumPy on the probe record),
    its correlation in correlations.csv, and its row in the multi-run table."""
    from moegrok import RunDir
    from moegrok.analysis import run_metrics

    monkeypatch.setattr(run_metrics, "METRICS", list(run_metrics.METRICS))  # the registry, restored afterwards
    run_metrics.register_metric("toy max route prob", "toy_max_prob",
                                lambda ctx: float(ctx.probe.route_probs[ctx.idx].max()), direction=+1)
    run = make_run(tmp_path / "toy", SynthSpec(seed=3, domains=("math", "knowledge", "math_twin")))
    assert main(["analyze", str(run), "--embedding", "tfidf", "--no-progress", "--no-figures"]) == 0
    rows = _csv(run / "analysis" / "metrics.csv")
    rd = RunDir(run)
    checked = 0
    for r in rows:
        if r["group"] == "domain":  # every probe sample of the domain: checkable by hand
            probe = rd.probe(int(r["step"]))
            rows_d = [i for i, d in enumerate(probe.domains) if d == r["domain"]]
            assert float(r["toy_max_prob"]) == pytest.approx(float(probe.route_probs[rows_d].max()), abs=1e-6)
            checked += 1
    assert checked == 3 * len(rd.steps)
    assert any(r["group"] == "memorized" and r["toy_max_prob"][:1].isdigit() for r in rows)
    corr = [c for c in _csv(run / "analysis" / "correlations.csv") if c["metric"] == "toy max route prob"]
    assert corr and any(c["pearson_r"] not in ("", "n/a") for c in corr)
    text = markdown({"t": [load_analysis(run)]}, ["math", "knowledge"], [])
    assert "| math | toy max route prob |" in text
    with pytest.raises(Exception, match="already registered"):
        run_metrics.register_metric("toy max route prob", "other", lambda ctx: 0.0)
