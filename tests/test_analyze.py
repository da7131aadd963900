"""`moegrok analyze` end to end on synthesized run directories, plus its edge cases."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moegrok.cli import main
from synthetic_run import SynthSpec, make_run

ROOT = Path(__file__).resolve().parents[1]

FILES = ("metrics.csv", "layerwise.csv", "samples.csv", "test_items.csv", "lag.csv", "correlations.csv",
         "correlations.md", "summary.json", "report.md")
FIGS = ("memorized_vs_accuracy.png", "lag.png", "distance_vs_loss.png", "layerwise_distance.png",
        "consistency_vs_loss.png")


def analyze(run, *extra):
    assert main(["analyze", str(run), "--embedding", "tfidf", "--no-progress", *extra]) == 0
    return run / "analysis"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def no_bare_nan(out):
    for name in FILES:
        text = (out / name).read_text()
        for bad in (",nan", "nan,", " nan ", "NaN"):
            assert bad not in text, f"{name} contains a bare NaN ({bad!r})"


def load_records(run):
    steps = sorted(int(p.name[5:]) for p in (run / "records").iterdir() if p.name.startswith("step_"))
    probes = [np.load(run / "records" / f"step_{s:09d}" / "probe.npz") for s in steps]
    evals = [json.loads((run / "records" / f"step_{s:09d}" / "eval.json").read_text()) for s in steps]
    return steps, probes, evals


def brute_t_star(l, eps, delta=0.05):
    """METHOD §2 literally: the first checkpoint before the last from which every loss is <= eps and within delta of
    the final one; None if there is none."""
    T = len(l)
    return next((t for t in range(T - 1) if all(l[u] <= eps and abs(l[u] - l[-1]) <= delta for u in range(t, T))),
                None)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("r") / "run")
    return run, analyze(run)


def test_writes_every_file_and_figures_open(full_run):
    run, out = full_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in FIGS:
        with Image.open(out / "figures" / name) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    report = (out / "report.md").read_text()
    for name in FIGS:
        assert f"figures/{name}" in report
    assert "char-3-5gram-tfidf" in report and "Benjamini-Hochberg" in report
    no_bare_nan(out)


def test_memorization_and_consistency_match_independent_recomputation(full_run):
    run, out = full_run
    steps, probes, evals = load_records(run)
    summary = json.loads((out / "summary.json").read_text())
    loss = np.stack([p["sample_loss"] for p in probes]).astype(np.float64)
    dom = probes[0]["domains"]
    samples = {int(r["sample_id"]): r for r in read_csv(out / "samples.csv")}
    for d in ("math", "knowledge"):
        eps = summary["domains"][d]["epsilon"]
        for i in np.flatnonzero(dom == d):
            t = brute_t_star(loss[:, i], eps)
            assert samples[i]["t_star_step"] == ("never" if t is None else str(steps[t]))
    # R of the memorized math samples at the last checkpoint, straight from METHOD §5
    mem = [i for i in np.flatnonzero(dom == "math") if samples[i]["t_star_step"] != "never"]
    p = probes[-1]
    e = np.einsum("nle,led->nld", p["route_probs"][mem].astype(np.float64), p["router_weights"].astype(np.float64))
    cos = (e[:, :-1] * e[:, 1:]).sum(-1) / (np.linalg.norm(e[:, :-1], axis=-1) * np.linalg.norm(e[:, 1:], axis=-1))
    row = next(r for r in read_csv(out / "metrics.csv")
               if r["domain"] == "math" and r["group"] == "memorized" and r["step"] == str(steps[-1]))
    assert float(row["R_mean"]) == pytest.approx(cos.mean(1).mean(), rel=1e-4)
    assert float(row["loss_mean"]) == pytest.approx(loss[-1, mem].mean(), rel=1e-5)


def test_memorization_on_answer_loss(tmp_path, capsys):
    """`--memorization-loss answer` finds memorization on the answer-token loss that the drifting whole-sample loss
    hides; a run without that field is refused with the file and field named."""
    run = make_run(tmp_path / "ans", SynthSpec(answer_loss=True))
    _, probes, _ = load_records(run)
    ans = np.stack([p["answer_loss"] for p in probes]).astype(np.float64)
    analyze(run, "--out", str(tmp_path / "a_sample"))
    samp = tmp_path / "a_sample"
    assert all(r["t_star_step"] == "never" for r in read_csv(samp / "samples.csv"))  # whole-sample loss drifts
    analyze(run, "--memorization-loss", "answer", "--out", str(tmp_path / "a_answer"))
    out = tmp_path / "a_answer"
    summary = json.loads((out / "summary.json").read_text())
    dom = probes[0]["domains"]
    samples = {int(r["sample_id"]): r for r in read_csv(out / "samples.csv")}
    steps = summary["steps"]
    found = 0
    for d in ("math", "knowledge"):
        eps = summary["domains"][d]["epsilon"]
        for i in np.flatnonzero(dom == d):
            t = brute_t_star(ans[:, i], eps)
            assert samples[i]["t_star_step"] == ("never" if t is None else str(steps[t]))
            found += t is not None
    assert found > 0
    assert "answer tokens" in (out / "report.md").read_text()
    plain = make_run(tmp_path / "plain")
    assert main(["analyze", str(plain), "--memorization-loss", "answer", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "probe.npz" in err and "answer_loss" in err


def test_in_run_twin_control_columns(tmp_path, capsys):
    """A `<d>_twin` domain is <d>'s control by default: its series against <d>'s accuracy, as NumPy computes it."""
    import scipy.stats

    run = make_run(tmp_path / "twin", SynthSpec(domains=("math", "math_twin")))
    out = analyze(run)
    rows = read_csv(out / "correlations.csv")
    metric = "training loss (domain)"
    _, probes, evals = load_records(run)
    dom = probes[0]["domains"]
    twin_loss = np.array([p["sample_loss"][dom == "math_twin"].mean() for p in probes])
    acc = np.array([e["test"]["math"]["accuracy"] for e in evals])
    row = next(r for r in rows if (r["domain"], r["window"], r["metric"], r["kind"]) == ("math", "all", metric, "raw"))
    assert float(row["control_pearson_r"]) == pytest.approx(scipy.stats.pearsonr(twin_loss, acc)[0], abs=1e-6)
    assert all(r["control_n"] == "" for r in rows if r["domain"] == "math_twin")
    assert "in-run control domain (math_twin for math)" in (out / "correlations.md").read_text()
    analyze(run, "--control-domain", "none", "--out", str(tmp_path / "off"))
    assert all(r["control_n"] == "" for r in read_csv(tmp_path / "off" / "correlations.csv"))
    assert main(["analyze", str(run), "--control-domain", "math=code_twin", "--no-progress"]) == 1
    assert "control domain 'code_twin' is not in this run" in capsys.readouterr().err


def test_pathway_columns_match_rapidfuzz(full_run):
    from rapidfuzz.distance import Levenshtein

    run, out = full_run
    steps, probes, _ = load_records(run)
    samples = read_csv(out / "samples.csv")
    rows = read_csv(out / "metrics.csv")
    for c in (0, len(steps) - 1):
        p = probes[c]
        for d in ("math", "knowledge"):
            mem = [int(r["sample_id"]) for r in samples if r["domain"] == d and r["t_star_step"] != "never"]
            paths = []
            for i in mem:  # tau rule written out: sort descending (stable), keep until the sum reaches 0.7
                layers = []
                for g in p["route_probs"][i].astype(np.float64):
                    order = sorted(range(len(g)), key=lambda e: (-g[e], e))
                    kept, total = [], 0.0
                    for e in order:
                        kept.append(e)
                        total += g[e]
                        if total >= 0.7:
                            break
                    layers.append(",".join(map(str, kept)))
                paths.append("-".join(layers))
            pairs = [(a, b) for k, a in enumerate(paths) for b in paths[k + 1:]]
            row = next(r for r in rows if r["domain"] == d and r["group"] == "memorized" and r["step"] == str(steps[c]))
            if len(pairs) == 0:
                assert row["path_text"].startswith("n/a")
                continue
            ref = np.mean([Levenshtein.distance(a, b) for a, b in pairs])
            ref_n = np.mean([Levenshtein.distance(a, b) / max(len(a), len(b)) for a, b in pairs])
            assert float(row["path_text"]) == pytest.approx(ref, rel=1e-5)
            assert float(row["path_text_norm"]) == pytest.approx(ref_n, rel=1e-5)


def test_correlation_table_matches_numpy(full_run):
    run, out = full_run
    steps, probes, evals = load_records(run)
    metrics = read_csv(out / "metrics.csv")
    acc = np.array([e["test"]["knowledge"]["accuracy"] for e in evals])
    loss = np.array([float(r["loss_mean"]) for r in sorted(
        (r for r in metrics if r["domain"] == "knowledge" and r["group"] == "domain"), key=lambda r: int(r["step"]))])
    row = next(r for r in read_csv(out / "correlations.csv") if r["domain"] == "knowledge" and r["window"] == "all"
               and r["metric"] == "training loss (domain)" and r["kind"] == "raw")
    assert int(row["n"]) == len(steps)
    assert float(row["pearson_r"]) == pytest.approx(np.corrcoef(loss, acc)[0, 1], rel=1e-4)
    val = np.array([e["val_loss"]["knowledge"] for e in evals])
    row = next(r for r in read_csv(out / "correlations.csv") if r["domain"] == "knowledge" and r["window"] == "all"
               and r["metric"] == "validation loss" and r["kind"] == "diff")
    assert int(row["n"]) == len(steps) - 1
    assert float(row["pearson_r"]) == pytest.approx(np.corrcoef(np.diff(val), np.diff(acc))[0, 1], rel=1e-4)
    md = (out / "correlations.md").read_text()
    assert "| metric | knowledge | math |" in md and "n=8" in md


def test_lag_rows_are_consistent(full_run):
    run, out = full_run
    lag = read_csv(out / "lag.csv")
    assert lag, "the synthetic run has memorized and generalized groups to pair"
    items = read_csv(out / "test_items.csv")
    samples = read_csv(out / "samples.csv")
    for r in lag:
        assert int(r["lag_steps"]) == int(r["test_step"]) - int(r["train_step"])
        assert int(r["n_train"]) == sum(s["domain"] == r["domain"] and s["t_star_step"] == r["train_step"]
                                        for s in samples)
        assert int(r["n_test"]) == sum(t["domain"] == r["domain"] and t["t_hash_step"] == r["test_step"]
                                       for t in items)
        assert r["embedding"] == "char-3-5gram-tfidf"


def test_one_moe_layer_consistency_na(tmp_path):
    out = analyze(make_run(tmp_path / "run", SynthSpec(num_layers=1, num_checkpoints=4)), "--no-figures")
    rows = read_csv(out / "metrics.csv")
    mem = [r for r in rows if r["group"] == "memorized"]
    assert mem and all(r["S_mean"].startswith("n/a: consistency needs at least 2 MoE layers") for r in mem)
    assert "needs at least 2 MoE layers" in (out / "report.md").read_text()
    corr = [r for r in read_csv(out / "correlations.csv") if r["metric"] == "raw consistency R"]
    assert all(r["note"].startswith("n/a") for r in corr)
    no_bare_nan(out)


@pytest.mark.parametrize("T", [1, 2])
def test_too_few_checkpoints(tmp_path, T):
    out = analyze(make_run(tmp_path / "run", SynthSpec(num_checkpoints=T)), "--no-figures")
    corr = read_csv(out / "correlations.csv")
    assert corr and all(r["note"].startswith("n/a") for r in corr)
    report = (out / "report.md").read_text()
    assert f"only {T} checkpoint(s)" in report
    if T == 1:
        assert "memorization needs at least 2 checkpoints" in report
    no_bare_nan(out)


def test_unfinished_run_is_provisional(tmp_path):
    out = analyze(make_run(tmp_path / "run", SynthSpec(finished=False, num_checkpoints=4)), "--no-figures")
    assert "not finished (provisional)" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["finished"] is False


def test_singleton_group_and_constant_metric(tmp_path):
    run = make_run(tmp_path / "run", SynthSpec(singleton_group=True, constant_val_loss=True, samples_per_domain=6,
                                               num_checkpoints=5))
    out = analyze(run, "--epsilon", "1.0", "--no-figures")
    rows = read_csv(out / "metrics.csv")
    single = [r for r in rows if r["domain"] == "math" and r["group"] == "Train@200"]
    assert single and all(r["n_samples"] == "1" and "group has 1 sample" in r["note"] for r in single)
    corr = [r for r in read_csv(out / "correlations.csv")
            if r["metric"] == "validation loss" and r["kind"] in ("raw", "partial") and r["window"] == "all"]
    assert len(corr) == 4 and all(r["note"] == "n/a: validation loss constant across checkpoints" for r in corr)
    no_bare_nan(out)


def test_control_run_columns(tmp_path):
    run = make_run(tmp_path / "run")
    ctl = make_run(tmp_path / "ctl", SynthSpec(seed=1, generalizes=False))
    out = analyze(run, "--control", str(ctl), "--no-figures", "--token-position", "2")
    rows = read_csv(out / "correlations.csv")
    assert any(r["metric"] == "pathway distance (token position)" and r["note"] == "" for r in rows)
    loss_rows = [r for r in rows if r["metric"] == "training loss (domain)" and r["window"] == "all"
                 and r["kind"] == "raw"]
    # both runs' losses fall over the same steps: the control "predicts" this run's accuracy too
    assert all(r["tracks_time"] == "True" for r in loss_rows)
    assert all(r["control_n"] == "8" for r in loss_rows)
    assert "same in control" in (out / "correlations.md").read_text()


def test_errors_are_clean(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    run = tmp_path / "empty"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"format": "moegrok-run/1", "finished": False}))
    assert main(["analyze", str(run), "--no-progress"]) == 1
    assert "no complete checkpoint record" in capsys.readouterr().err
    assert main(["analyze", str(run), "--tau", "1.5"]) == 1
    assert "analysis.tau must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("delta", "-1.0"), ("tau", "0.0"), ("epsilon", "0.0"),
                                                ("max_pair_samples", "1")])
def test_analyze_and_run_refuse_the_same_values(tmp_path, capsys, key, value):
    """The rule lives in AnalysisConfig: `moegrok analyze --KEY` and `analysis: {KEY: ...}` through `moegrok run`
    give the same message, and the study stops before training anything."""
    run = tmp_path / "empty"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"format": "moegrok-run/1", "finished": False}))
    assert main(["analyze", str(run), f"--{key.replace('_', '-')}", value]) == 1
    flag_err = capsys.readouterr().err
    cfg = ROOT / "configs" / "tiny.yaml"
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "study"), f"analysis.{key}={value}"]) == 1
    run_err = capsys.readouterr().err
    assert f"analysis.{key} must" in flag_err and flag_err.split("error: ")[1] == run_err.split("error: ")[1]
    assert not (tmp_path / "study").exists()


def test_analysis_section_of_the_wrong_type_is_named(tmp_path, capsys):
    cfg = ROOT / "configs" / "tiny.yaml"
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "study"), "analysis.delta=abc"]) == 1
    assert "analysis.delta: expected a number, got 'abc'" in capsys.readouterr().err


def test_lag_figure_draws_the_most_similar_positive_lags():
    from moegrok.analysis.figures import lag_pairs_to_draw
    from moegrok.analysis.generalization import LagPair

    def pair(p, q, sim):
        return LagPair("math", p, q, 100 * p, 100 * q, sim, 3, 4)

    pairs = [pair(1, 3, 0.5), pair(2, 1, 0.99), pair(1, 6, 0.7), pair(4, 4, 0.95), pair(2, 5, 0.7), pair(0, 2, 0.6),
             pair(3, 9, 0.2)]
    drawn = lag_pairs_to_draw(pairs)
    # negative and zero lags are left out; 0.7 twice: the longer lag (500 steps) first
    assert [(p.train_index, p.test_index) for p in drawn] == [(1, 6), (2, 5), (0, 2), (1, 3)]
    assert lag_pairs_to_draw(pairs, 2) == drawn[:2]
    assert lag_pairs_to_draw([pair(2, 1, 0.9)]) == []
