"""The late-and-sharp transition definition on hand-built curves whose answers are worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from moegrok.analysis.transition import judge, memorized_since

STEPS = [100 * (i + 1) for i in range(20)]  # 20 checkpoints, 2,000 steps


def loss_curve(mem_at: int) -> list[float]:
    return [2.0 - 0.3 * i if i < mem_at else 0.1 for i in range(20)]


def test_memorized_since_is_the_start_of_the_final_run_below_threshold():
    assert memorized_since([1.0, 0.1, 0.5, 0.19, 0.2, 0.05]) == 3
    assert memorized_since([0.1, 0.1]) == 0
    assert memorized_since([0.1, 0.3]) is None
    assert memorized_since([0.1, float("nan"), 0.1]) == 2  # NaN counts as not memorized
    assert memorized_since([]) is None


def test_late_sharp_jump():
    acc = [0.05] * 10 + [0.2, 0.6, 0.9] + [0.9] * 7
    t = judge("math", STEPS, acc, loss_curve(4), 2000)
    # G = 0.9 - 0.05 = 0.85; 10 % point: first acc >= 0.135 -> index 10; 90 %: >= 0.815 -> index 12
    assert (t.t_mem, t.onset, t.end, t.delay) == (4, 10, 12, 6)
    assert t.gain == pytest.approx(0.85)
    assert t.rise_frac == pytest.approx((1300 - 1100) / 2000)
    assert t.late_sharp and t.onset_step == 1100 and t.t_mem_step == 500


def test_slow_creep_is_not_a_transition():
    acc = list(np.linspace(0.05, 0.75, 20))
    t = judge("math", STEPS, acc, loss_curve(2), 2000)
    # acc_i = 0.05 + 0.7 i / 19; at t_mem = 2: 0.124, G = 0.626; 10 % point: acc >= 0.186 -> i = 4 (delay 2);
    # 90 % point: acc >= 0.687 -> i = 18; the rise spans steps 500 -> 1900, 70 % of training
    assert t.delay == 2 and t.end == 18 and t.rise_frac == pytest.approx(0.7) and not t.late_sharp


def test_generalizing_while_memorizing_has_too_little_gain_after():
    acc = [0.1, 0.3, 0.5, 0.7, 0.8] + [0.85] * 15
    t = judge("math", STEPS, acc, loss_curve(4), 2000)
    assert t.gain == pytest.approx(0.05) and not t.late_sharp


def test_jump_too_soon_after_memorization_is_not_late():
    acc = [0.05] * 6 + [0.9] * 14
    t = judge("math", STEPS, acc, loss_curve(4), 2000)
    assert t.delay == 2 and not t.late_sharp
    t = judge("math", STEPS, [0.05] * 7 + [0.9] * 13, loss_curve(4), 2000)
    assert t.delay == 3 and t.late_sharp


def test_never_memorized_and_falling_accuracy():
    t = judge("k", STEPS, [0.5] * 20, [1.0] * 20, 2000)
    assert t.t_mem is None and not t.late_sharp and "never memorized" in t.describe()
    t = judge("k", STEPS, [0.5] * 10 + [0.2] * 10, loss_curve(3), 2000)
    assert t.gain < 0 and t.onset is None and not t.late_sharp


def test_thresholds_are_parameters():
    acc = [0.05] * 10 + [0.2, 0.6, 0.9] + [0.9] * 7
    assert not judge("m", STEPS, acc, loss_curve(4), 2000, min_gain=0.9).late_sharp
    assert not judge("m", STEPS, acc, loss_curve(4), 2000, min_delay=7).late_sharp
    assert not judge("m", STEPS, acc, loss_curve(4), 2000, max_rise=0.05).late_sharp
    assert judge("m", STEPS, acc, [0.3] * 20, 2000, mem_loss=0.35).t_mem == 0
