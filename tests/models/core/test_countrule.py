from __future__ import annotations

import numpy as np
import pytest

from polymorphd.models.core.countrule import calibrate_count, count_decides, count_mae


def test_count_decides_near_whole_numbers():
    assert count_decides(2.04, 0.05) is True and count_decides(2.4, 0.05) is False
    assert count_decides(np.array([0.9, 1.5, 3.0]), 0.1).tolist() == [True, False, True]
    assert count_mae(np.array([-1.0, 2.5]), np.array([0.0, 2.0])) == pytest.approx(
        0.25
    )  # negatives count as 0


def test_a_count_exit_answers_where_it_is_as_right_as_the_final():
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 4, 400).astype(float)
    final = truth + rng.normal(0, 0.1, 400)
    # the exit is right when its count is near a whole number, wrong (off by 0.4-0.5) otherwise
    near = rng.random(400) < 0.6
    exit_ = np.where(near, truth + rng.normal(0, 0.03, 400), truth + rng.choice([-0.45, 0.45], 400))
    groups = np.repeat(np.arange(8), 50)
    margin, stats = calibrate_count(exit_, final, truth, tolerance=0.05, groups=groups)
    assert 0.05 <= margin < 0.45
    assert stats["exit_rate"] == pytest.approx(np.mean(np.abs(exit_ - np.round(exit_)) <= margin))
    assert stats["exit_mae"] <= stats["final_mae"] + 0.05


def test_a_count_exit_that_is_always_wrong_never_answers():
    truth = np.tile([1.0, 2.0, 3.0], 100)
    margin, stats = calibrate_count(
        truth + 1.0, truth, truth, tolerance=0.05, groups=np.repeat(np.arange(6), 50)
    )
    assert margin == -1.0 and stats["exit_rate"] == 0.0
    assert not count_decides(2.0, margin)
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        calibrate_count(truth, truth[:3], truth)
