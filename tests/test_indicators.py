"""Indicator registry and benchmark: change points and leads on hand-built series with known answers, the sign
test and AUROC against brute force, and `moegrok indicators` end to end on hand-made run directories."""
from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest

from moegrok.analysis import benchmark as bm
from moegrok.analysis import indicators as ind
from moegrok.rundir import write_jsonl, write_meta, write_record


# ------------------------------------------------------------------------------------------------ change points
def kinked(n: int, vertex: int, s1: float = 0.1, s2: float = -1.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    x = np.arange(n, dtype=float)
    y = np.where(x <= vertex, s1 * x, s1 * vertex + s2 * (x - vertex))
    return y + noise * np.random.default_rng(seed).normal(size=n)


@pytest.mark.parametrize("vertex", [2, 5, 9, 13, 16])  # vertex in [2, n - 4]: 3 points a segment
def test_change_point_finds_the_kink(vertex):
    assert bm.change_point(kinked(20, vertex)) == vertex
    assert bm.change_point(kinked(20, vertex, noise=0.02, seed=vertex)) == vertex


def test_change_point_window_and_degenerate_series():
    y = kinked(20, 12)
    assert bm.change_point(y, start=4) == 12  # an index into the whole series
    assert bm.change_point(np.ones(20)) is None  # constant
    assert bm.change_point(y[:5]) is None  # too short for two segments
    y[3] = np.nan
    assert bm.change_point(y) is None and bm.change_point(y, start=4) == 12


def brute_force_clinear(y: np.ndarray) -> int:
    """The vertex v minimising the squared error of the two chords y[0]..y[v] and y[v]..y[-1]."""
    n = len(y)
    best, arg = np.inf, None
    for v in range(2, n - 3):
        a = np.interp(np.arange(v + 1), [0, v], [y[0], y[v]])
        b = np.interp(np.arange(v, n), [v, n - 1], [y[v], y[-1]])
        err = ((y[:v + 1] - a) ** 2).sum() + ((y[v:] - b) ** 2).sum()
        if err < best - 1e-12:
            best, arg = err, v
    return arg


@pytest.mark.parametrize("seed", range(6))
def test_change_point_equals_brute_force_chord_fit(seed):
    y = kinked(16, 4 + seed, noise=0.3, seed=seed)
    assert bm.change_point(y) == brute_force_clinear(y)


# ------------------------------------------------------------------------------------------------ statistics
def brute_sign_p(k: int, n: int) -> float:
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-7)))


@pytest.mark.parametrize("leads", [[1, 2, 3, -1, 0, 4, 2], [3] * 8, [-1, -2, 1], [0, 0], [2, -2, 1, -1]])
def test_sign_test_against_brute_force(leads):
    p, k, n = bm.sign_test(leads)
    nz = [v for v in leads if v != 0]
    assert (k, n) == (sum(v > 0 for v in nz), len(nz))
    if n == 0:
        assert math.isnan(p)
    else:
        assert p == pytest.approx(brute_sign_p(k, n))


def test_auroc_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        pos, neg = rng.integers(0, 5, 7).astype(float), rng.integers(0, 5, 9).astype(float)
        want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])
        assert bm.auroc(pos, neg) == pytest.approx(want)
    assert bm.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert math.isnan(bm.auroc([], [1.0]))


def test_effective_rank():
    assert ind.effective_rank(np.eye(4)) == pytest.approx(4.0)
    assert ind.effective_rank(np.outer([1, 2, 3], [1, 0, 1])) == pytest.approx(1.0)
    s = np.array([3.0, 1.0])
    q = s / s.sum()
    assert ind.effective_rank(np.diag(s)) == pytest.approx(np.exp(-(q * np.log(q)).sum()))


def test_param_norms_split_by_module():
    params = {"embed": np.full((2, 2), 1.0), "layers": {"0": {
        "attn": {"wq": np.full((2, 2), 2.0), "q_norm": {"scale": np.ones(2)}},
        "moe": {"router": np.full((2, 3), 3.0), "gate_up": np.ones((3, 2, 4)), "down": np.ones((3, 2, 2))}}}}
    n = ind.param_norms(params)
    assert n["router"] == pytest.approx(np.sqrt(6 * 9))
    assert n["experts"] == pytest.approx(np.sqrt(24 + 12))
    assert n["attention"] == pytest.approx(np.sqrt(16 + 2))
    assert n["all"] == pytest.approx(np.sqrt(4 + 16 + 2 + 54 + 36))


# ------------------------------------------------------------------------------------------------ end to end
T = 20
STEPS = [100 * (i + 1) for i in range(T)]


def make_run(path, *, onset: int | None, kink: int, mem_at: int = 4, seed: int = 0, parent=None):
    """Two domains, `math` and its twin. Median answer loss of both falls below 0.2 at `mem_at`; math's accuracy
    jumps 0.05 -> 0.9 at `onset` (None: stays at 0.05); the model's parameter norm falls from checkpoint `kink`
    (so `norm_all` changes there); everything else is noise-free and flat."""
    rng = np.random.default_rng(seed)
    doms = np.array(["math"] * 4 + ["math_twin"] * 4)
    L, E, d = 2, 4, 3
    write_jsonl(path / "probes.jsonl", [{"id": i, "domain": str(x), "text": "x"} for i, x in enumerate(doms)])
    write_meta(path, producer="test", domains=["math", "math_twin"], total_steps=STEPS[-1], finished=True,
               corpus={"domains": {"math": {"twin": False}, "math_twin": {"twin": True}}},
               **({"parent": parent} if parent else {}))
    route = np.full((8, L, E), 1 / E, np.float32)
    for c, s in enumerate(STEPS):
        loss = 2.0 if c < mem_at else 0.1
        acc = 0.9 if onset is not None and c >= onset else 0.05
        probe = {"sample_ids": np.arange(8), "domains": doms, "sample_loss": np.full(8, loss + 1, np.float32),
                 "answer_loss": np.full(8, loss, np.float32), "route_probs": route,
                 "router_weights": rng.normal(size=(L, E, d)).astype(np.float32),
                 "topk_ids": np.tile(np.arange(2, dtype=np.int32), (8, 5, L, 1)),
                 "topk_weights": np.full((8, 5, L, 2), 0.25, np.float32), "token_mask": np.ones((8, 5), bool),
                 "tokens": np.zeros((8, 5), np.int32)}
        norm = 10.0 + 0.01 * c if c <= kink else 10.0 + 0.01 * kink - 0.5 * (c - kink)
        test = {dd: {"accuracy": a, "ids": [0], "correct": [int(a > 0.5)]}
                for dd, a in (("math", acc), ("math_twin", 0.05))}
        write_record(path, s, probe, {"val_loss": {"math": 1.0, "math_twin": 1.0}, "test": test,
                                      "param_norms": {"all": norm, "router": 1.0, "experts": 1.0, "attention": 1.0}})
    return path


@pytest.fixture
def runs(tmp_path):
    """Transitions at onsets 10, 12, 14 with the norm's kink 2 checkpoints earlier, one at onset 9 with the kink 2
    checkpoints later, and one run that never generalizes. Two forks of the first."""
    specs = {"a": (10, 8), "b": (12, 10), "c": (14, 12), "d": (9, 11), "never": (None, 8)}
    out = {}
    for name, (onset, kink) in specs.items():
        (tmp_path / name).mkdir()
        out[name] = make_run(tmp_path / name, onset=onset, kink=kink)
    for name, onset in (("fork1", 8), ("fork2", 16)):
        (tmp_path / name).mkdir()
        out[name] = make_run(tmp_path / name, onset=onset, kink=onset - 2,
                             parent={"run_dir": str(out["a"]), "step": 500})
    return out


def test_benchmark_leads_sign_test_auroc_and_forks(runs, tmp_path):
    summary, rows = bm.run_benchmark(list(runs.values()), tmp_path / "out", progress=False)
    s = {x["indicator"]: x for x in summary}["norm_all"]
    leads = {(r["run"], r["domain"]): r["lead_ckpt"] for r in rows if r["indicator"] == "norm_all"}
    assert leads[("a", "math")] == 2 and leads[("b", "math")] == 2 and leads[("c", "math")] == 2
    assert leads[("d", "math")] == -2 and leads[("fork1", "math")] == 2 and leads[("fork2", "math")] == 2
    assert leads[("never", "math")] is None and leads[("a", "math_twin")] is None
    assert s["n"] == 6 and s["median_lead_ckpt"] == 2 and s["frac_leading"] == pytest.approx(5 / 6)
    assert (s["sign_k"], s["sign_n"]) == (5, 6) and s["sign_p"] == pytest.approx(brute_sign_p(5, 6))
    # window t_mem=4 .. 7: the norm still rises (+0.03) in every run whose kink is >= 7, falls in fork1 (kink 6)
    scores = {(r["run"], r["domain"]): r["window_score"] for r in rows if r["indicator"] == "norm_all"}
    assert scores[("a", "math")] == pytest.approx(-0.03) and scores[("fork1", "math")] == pytest.approx(0.5 * 1 - 0.02)
    pos = [scores[(n, "math")] for n in ("a", "b", "c", "d", "fork1", "fork2")]
    twins = [scores[(n, "math_twin")] for n in runs]
    assert s["auroc_twin"] == pytest.approx(np.mean([1.0 if p > q else 0.5 if p == q else 0.0
                                                     for p in pos for q in twins]))
    assert s["n_pos"] == 6 and s["n_twin"] == 7 and s["n_neg_all"] == 8
    # forks and their parent: change step = onset step - 200 exactly -> slope 1, r 1
    assert s["fork_n"] == 3 and s["fork_slope"] == pytest.approx(1.0) and s["fork_r"] == pytest.approx(1.0)
    # outputs
    with open(tmp_path / "out" / "indicators.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["indicator"] for r in table] == list(ind.REGISTRY)
    md = (tmp_path / "out" / "indicators.md").read_text()
    assert "parameter L2 norm (all)" in md and "| a | math | 500 |" in md
    assert (tmp_path / "out" / "figures" / "aligned.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "figures" / "leads.png").stat().st_size > 5_000


def test_a_toy_indicator_through_the_registry_alone(runs, tmp_path):
    """One register() call is all it takes: a toy signal (minus twice the parameter norm, so it rises where the
    norm falls) shows up in every output with norm_all's leads."""
    try:
        ind.register("toy", "toy signal", "test", 1, True)(lambda ck, d: -2.0 * ck.param_norms["all"])
        summary, rows = bm.run_benchmark(list(runs.values()), tmp_path / "out", progress=False, figures=False)
    finally:
        ind.unregister("toy")
    s = {x["indicator"]: x for x in summary}
    assert s["toy"]["n"] == 6 and s["toy"]["median_lead_ckpt"] == 2
    toy = {(r["run"], r["domain"]): r["lead_ckpt"] for r in rows if r["indicator"] == "toy"}
    norm = {(r["run"], r["domain"]): r["lead_ckpt"] for r in rows if r["indicator"] == "norm_all"}
    assert toy == norm
    assert s["toy"]["auroc_twin"] == pytest.approx(s["norm_all"]["auroc_twin"])
    assert "toy signal" in (tmp_path / "out" / "indicators.md").read_text()
    assert "toy" in (tmp_path / "out" / "leads.csv").read_text()
    assert "toy" not in ind.REGISTRY


def test_cli(runs, tmp_path, capsys):
    from moegrok.cli import main

    assert main(["indicators", str(runs["a"]), str(runs["never"]), "--out", str(tmp_path / "o"), "--no-progress",
                 "--no-figures"]) == 0
    assert (tmp_path / "o" / "leads.csv").exists()
    assert main(["indicators", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 1
    assert "missing" in capsys.readouterr().err
