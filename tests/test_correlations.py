"""Correlations (METHOD §6) against independent NumPy formulas and hand-worked cases."""
import math

import numpy as np
import pytest
import scipy.stats

from moegrok.analysis.correlations import (adjust_pvalues, compare_with_control, correct_rows,
                                           correlate, correlate_series, first_differences, markdown_table,
                                           moving_average, partial_correlation, sustained_rise_start)


def ref_r_p(x, y, covariates=0):
    """Pearson r from the centred dot product, p from Student's t with n - 2 - covariates dof."""
    x, y = np.asarray(x, float) - np.mean(x), np.asarray(y, float) - np.mean(y)
    r = x @ y / math.sqrt((x @ x) * (y @ y))
    df = len(x) - 2 - covariates
    t = r * math.sqrt(df / (1 - r * r))
    return r, 2 * scipy.stats.t.sf(abs(t), df)


def ranks(v):
    return np.argsort(np.argsort(v)).astype(float)  # no ties in these tests


def test_correlate_matches_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = 0.6 * x + rng.normal(size=12)
    c = correlate(x, y)
    r, p = ref_r_p(x, y)
    assert c.n == 12 and c.ok and c.note is None
    assert c.pearson_r == pytest.approx(r) and c.pearson_p == pytest.approx(p, rel=1e-6)
    rs, ps = ref_r_p(ranks(x), ranks(y))
    assert c.spearman_r == pytest.approx(rs) and c.spearman_p == pytest.approx(ps, rel=1e-6)


def test_first_differences_remove_shared_trend():
    t = np.arange(10.0)
    noise = np.array([0.3, -0.2, 0.5, -0.4, 0.1, 0.2, -0.5, 0.4, -0.1, 0.0])
    x, y = t + noise, t + np.roll(noise, 3)  # raw: both trend up; changes: unrelated noise
    assert correlate(x, y).pearson_r > 0.9
    d = first_differences(x, y)
    r, p = ref_r_p(np.diff(x), np.diff(y))
    assert d.n == 9 and d.pearson_r == pytest.approx(r) and d.pearson_p == pytest.approx(p, rel=1e-6)
    assert abs(d.pearson_r) < 0.5


def test_partial_correlation_vs_regression_residuals_and_formula():
    rng = np.random.default_rng(4)
    z = np.arange(15.0) * 100
    x = 0.01 * z + rng.normal(size=15)
    y = 0.02 * z + 0.5 * x + rng.normal(size=15)
    c = partial_correlation(x, y, z)
    # reference 1: residuals of degree-1 polynomial fits
    rx = x - np.polyval(np.polyfit(z, x, 1), z)
    ry = y - np.polyval(np.polyfit(z, y, 1), z)
    r, p = ref_r_p(rx, ry, covariates=1)
    assert c.n == 15 and c.pearson_r == pytest.approx(r) and c.pearson_p == pytest.approx(p, rel=1e-6)
    # reference 2: the textbook formula from the three pairwise correlations
    rxy, rxz, ryz = np.corrcoef(x, y)[0, 1], np.corrcoef(x, z)[0, 1], np.corrcoef(y, z)[0, 1]
    assert c.pearson_r == pytest.approx((rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)))
    # Spearman column: the same on ranks
    rk = [ranks(v) for v in (x, y, z)]
    rrx = rk[0] - np.polyval(np.polyfit(rk[2], rk[0], 1), rk[2])
    rry = rk[1] - np.polyval(np.polyfit(rk[2], rk[1], 1), rk[2])
    assert c.spearman_r == pytest.approx(ref_r_p(rrx, rry, 1)[0])


def test_na_outcomes_have_reasons():
    assert correlate([1, 2], [3, 4]).note == "n/a: fewer than 3 checkpoints with a value (n=2)"
    c = correlate([1, 1, 1, 1], [1, 2, 3, 4], "S")
    assert not c.ok and c.note == "n/a: S constant across checkpoints" and math.isnan(c.pearson_r)
    assert "accuracy constant" in correlate([1, 2, 3, 4], [0.5] * 4).note
    d = correlate([1, np.nan, 3, 4, 2], [1, 2, 3, 5, 2])
    assert d.ok and d.n == 4 and "1 checkpoint(s) without a value dropped" in d.note
    assert "at least 4" in partial_correlation([1, 2, 3], [3, 1, 2], [1, 2, 3]).note
    assert "linear function of the step" in partial_correlation([1, 2, 3, 4], [1, 3, 2, 4], [1, 2, 3, 4]).note


def test_pvalue_corrections_hand_worked():
    p = [0.01, 0.04, 0.03, 0.2, np.nan]
    np.testing.assert_allclose(adjust_pvalues(p, "bh")[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    np.testing.assert_allclose(adjust_pvalues(p, "holm")[:4], [0.04, 0.09, 0.09, 0.2])
    assert np.isnan(adjust_pvalues(p, "bh")[4])
    assert np.isnan(adjust_pvalues([np.nan], "holm")).all()


def test_sustained_rise_start_hand_worked():
    # peak 0.6 at 6, base 0.02, level 0.02 + 0.1 * 0.58 = 0.078; last point <= level before the peak: index 3
    start, why = sustained_rise_start([0.02, 0.03, 0.02, 0.05, 0.2, 0.5, 0.6, 0.55])
    assert start == 3 and "checkpoint 3" in why
    start, why = sustained_rise_start([0.01, 0.02, 0.03, 0.02])
    assert start is None and why.startswith("n/a: accuracy never rises")


def test_moving_average_trailing():
    np.testing.assert_allclose(moving_average([3, 6, 9, 0, 3]), [3, 4.5, 6, 5, 4])


def test_tables_correction_and_control_flag():
    t = np.arange(8.0)
    acc = np.array([0, 0, 0.1, 0.2, 0.5, 0.7, 0.8, 0.85])
    metrics = {"loss": 3 - 0.3 * t, "S": np.array([0.1, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.8]), "flat": np.ones(8)}
    rows = correct_rows(correlate_series("math", "all", metrics, acc, t * 100), "bh")
    assert len(rows) == 9
    raw = [r for r in rows if r.kind == "raw"]
    ok_p = [r.corr.pearson_p for r in raw if r.corr.ok]
    np.testing.assert_allclose(sorted(r.pearson_p_adj for r in raw if r.corr.ok),
                               sorted(scipy.stats.false_discovery_control(ok_p)))
    ctl = correlate_series("math", "all", {"loss": 3 - 0.3 * t, "S": np.full(8, 0.1) + 0.01 * (t % 2)}, acc, t)
    both = compare_with_control(rows, ctl)
    flag = {(r.metric, r.kind): r.tracks_time for r in both}
    assert flag[("loss", "raw")] is True  # the control's loss falls the same way: tracks time
    assert flag[("S", "raw")] is False
    assert flag[("flat", "raw")] is None
    md = markdown_table(both, "all", "raw", ["S", "loss", "flat"])
    lines = md.splitlines()
    assert lines[0] == "| metric | math |" and lines[2].startswith("| S | r=+")
    assert "same in control" in lines[3] and "n/a: metric constant" not in md and "flat constant" in md


def test_tracks_time_rule():
    from moegrok.analysis.correlations import Corr, tracks_time

    run = Corr(8, pearson_r=0.9, pearson_p=0.01)
    assert tracks_time(run, Corr(8, pearson_r=0.5, pearson_p=0.2)) is True    # same sign, >= half, >= 0.3
    assert tracks_time(run, Corr(8, pearson_r=0.4, pearson_p=0.3)) is False   # under half the run's strength
    assert tracks_time(run, Corr(8, pearson_r=-0.9, pearson_p=0.01)) is False  # opposite direction
    weak = Corr(8, pearson_r=0.1, pearson_p=0.8)
    assert tracks_time(weak, Corr(8, pearson_r=0.08, pearson_p=0.85)) is False  # noise-level control
    assert tracks_time(run, Corr(2, note="n/a: fewer than 3 checkpoints with a value (n=2)")) is None
