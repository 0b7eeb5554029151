from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from polymorphd.models.core import metrics
from polymorphd.models.core.metrics import average_precision, mean_average_precision


def test_hand_checked_ranking() -> None:
    # hits at ranks 1 and 3: (1/2) * 1 + (1/2) * (2/3)
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0, 1]), np.array([0.9, 0.1])) == pytest.approx(0.5)
    assert average_precision(np.array([1, 1, 0]), np.array([3.0, 2.0, 1.0])) == 1.0


def test_ties_form_one_threshold() -> None:
    # both frames at the same score: one cut, precision 1/2 at recall 1
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    # a tie group of [1, 0, 1] after a hit: (1/3) * 1 + (2/3) * (3/4)
    y, s = np.array([1, 1, 0, 1]), np.array([0.9, 0.4, 0.4, 0.4])
    assert average_precision(y, s) == pytest.approx(1 / 3 + 2 / 3 * 3 / 4)


def test_no_positive_is_nan() -> None:
    assert math.isnan(average_precision(np.zeros(4), np.arange(4.0)))
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0)))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.booleans(), min_size=n, max_size=n),
            st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), min_size=n, max_size=n),
        )
    )
)
def test_matches_sklearn_with_heavy_ties(case: tuple[list[bool], list[float]]) -> None:
    y, s = np.array(case[0]), np.array(case[1])
    if not y.any():
        assert math.isnan(average_precision(y, s))
        return
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_mean_average_precision_matches_sklearn_per_class() -> None:
    rng = np.random.default_rng(0)
    Y = rng.random((400, 12)) < 0.15
    Y[:, 5] = False  # no positive: excluded from the mean
    S = np.round(rng.random((400, 12)) + 0.3 * Y, 2)  # rounding makes ties
    mean, per_class = mean_average_precision(Y, S)
    ref = np.array(
        [average_precision_score(Y[:, k], S[:, k]) if Y[:, k].any() else np.nan for k in range(12)]
    )
    assert math.isnan(per_class[5])
    np.testing.assert_allclose(per_class, ref, atol=1e-12, equal_nan=True)
    assert mean == pytest.approx(np.nanmean(ref), abs=1e-12)


def test_blocks_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    Y = rng.random((50, 7)) < 0.3
    S = rng.random((50, 7))
    whole = mean_average_precision(Y, S)[1]
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 100)  # 2 columns per block
    np.testing.assert_array_equal(mean_average_precision(Y, S)[1], whole)


def test_mean_is_nan_without_any_positive() -> None:
    mean, per_class = mean_average_precision(np.zeros((3, 2)), np.ones((3, 2)))
    assert math.isnan(mean) and np.isnan(per_class).all()


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"labels have shape \(3,\) but scores have shape \(4,\)"):
        average_precision(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        average_precision(np.array([1, 0]), np.array([np.nan, 0.5]))
    with pytest.raises(ValueError, match="0/1"):
        average_precision(np.array([2, 0]), np.array([0.1, 0.5]))
    with pytest.raises(ValueError, match="1-D"):
        average_precision(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        mean_average_precision(np.zeros(2), np.zeros(2))


def test_label_quality_matches_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    Y = rng.random((200, 12)) < 0.15
    pred = np.where(rng.random((200, 12)) < 0.1, ~Y, Y)  # 10 % of the decisions flipped
    pred[:5] = False
    Y[:5] = False  # frames empty on both sides count as right (sklearn: zero_division=1)
    q = metrics.label_quality(pred, Y)
    assert q["label_f1"] == pytest.approx(
        sk.f1_score(Y, pred, average="samples", zero_division=1.0), abs=1e-12
    )
    assert q["exact_match"] == pytest.approx(sk.accuracy_score(Y, pred), abs=1e-12)
    assert 0.0 < q["exact_match"] < q["label_f1"] < 1.0


def test_label_quality_rejects_mismatched_shapes_and_is_nan_without_frames() -> None:
    with pytest.raises(ValueError, match=r"predicted labels have shape \(2, 3\), truth \(2, 4\)"):
        metrics.label_quality(np.zeros((2, 3)), np.zeros((2, 4)))
    assert all(math.isnan(v) for v in metrics.label_quality(np.zeros((0, 3)), np.zeros((0, 3))).values())


def test_video_resamples_draw_whole_videos_with_replacement() -> None:
    groups = np.repeat([7, 3, 9, 5], [2, 3, 1, 4])  # 4 videos of 2, 3, 1 and 4 frames
    draws = metrics.video_resamples(groups, 300, seed=1)
    assert len(draws) == 300
    counts = []
    for d in draws:
        drawn = groups[d]
        # every drawn video comes with all its frames, as many times as it was drawn
        videos, n = np.unique(drawn, return_counts=True)
        per_video = {7: 2, 3: 3, 9: 1, 5: 4}
        assert all(k % per_video[v] == 0 for v, k in zip(videos, n, strict=True))
        # as many videos as there are
        assert sum(k // per_video[v] for v, k in zip(videos, n, strict=True)) == 4
        counts.append(len(videos))
    assert min(counts) < 4 and max(counts) == 4  # with replacement: some draws repeat a video
    assert metrics.video_resamples(np.zeros(5), 10) == []  # one video: nothing to resample
    assert metrics.video_resamples(groups, 0) == []
    with pytest.raises(ValueError, match="resamples must be >= 0, got -1"):
        metrics.video_resamples(groups, -1)


def test_interval_reflects_the_spread_between_videos_not_between_frames() -> None:
    # 20 videos of 50 frames; each video's frames share one F1 (near copies), videos spread 0.5-0.9
    rng = np.random.default_rng(0)
    per_video = rng.uniform(0.5, 0.9, 20)
    groups = np.repeat(np.arange(20), 50)
    values = per_video[groups]
    means = [values[d].mean() for d in metrics.video_resamples(groups, 400, seed=2)]
    lo, hi = metrics.percentile_interval(means)
    se = per_video.std() / np.sqrt(20)
    assert lo < values.mean() < hi
    assert 2.5 * se < hi - lo < 5.5 * se  # about +-1.96 standard errors of a 20-video mean
    # identical videos: no spread at all
    same = [np.full(1000, 0.7)[d].mean() for d in metrics.video_resamples(groups, 50)]
    assert metrics.percentile_interval(same) == pytest.approx((0.7, 0.7))
    assert metrics.percentile_interval([np.nan, np.nan]) is None
    with pytest.raises(ValueError, match="level must be in"):
        metrics.percentile_interval([1.0], level=1.0)
