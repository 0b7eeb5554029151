from __future__ import annotations

import math

import numpy as np
import pytest

from polymorphd.models.core.calibrate import (
    DEFAULT_GRID,
    calibrate_exit,
    centre,
    class_thresholds,
    decision_thresholds,
    final_scale,
    global_threshold,
    logit_offsets,
    recall_thresholds,
)
from polymorphd.models.core.exitrule import exit_decides, exit_labels
from polymorphd.models.core.metrics import frame_f1, mean_average_precision


def test_class_thresholds_hand_cases() -> None:
    Y = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0]])
    P = np.array([[0.9, 0.1, 0.6], [0.8, 0.2, 0.4], [0.3, 0.3, 0.6], [0.2, 0.4, 0.6]])
    thr = class_thresholds(Y, P, default=0.7)
    # class 0: cut between 0.8 and 0.3; class 1: no positive -> default
    assert thr[0] == pytest.approx(0.55) and thr[1] == 0.7
    # class 2: the best F1 (0.8) predicts every frame present -> below the lowest score
    assert thr[2] == pytest.approx(0.2)


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = np.sum(y & pred)
    return 2 * tp / (np.sum(y) + np.sum(pred)) if np.sum(y) + np.sum(pred) else 0.0


def test_class_thresholds_reach_the_best_f1() -> None:
    rng = np.random.default_rng(0)
    Y = rng.random((120, 6)) < 0.3
    P = np.clip(np.round(0.4 * Y + rng.random((120, 6)) * 0.7, 2), 0, 1)
    thr = class_thresholds(Y, P)
    for k in range(6):
        best = max(_f1(Y[:, k], P[:, k] >= s) for s in np.unique(P[:, k]))
        assert _f1(Y[:, k], P[:, k] > thr[k]) == pytest.approx(best)


def _case(flip: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half the frames: exit confident (0.02 / 0.97) and right; half: the exit shrugs (0.5).
    The final classifier is always right. `flip` confident frames have one confidently wrong label."""
    rng = np.random.default_rng(seed)
    F, K = 200, 5
    Y = rng.random((F, K)) < 0.3
    P_final = np.where(Y, 0.9, 0.1)
    P_exit = np.where(Y, 0.97, 0.02)
    P_exit[F // 2 :] = 0.5
    for f in range(flip):
        P_exit[f, 0] = 0.99 - P_exit[f, 0]  # 0.97 <-> 0.02: same values, wrong side
    return P_exit, P_final, Y, np.full(K, 0.5)


def _mean_frame_f1(pred: np.ndarray, Y: np.ndarray) -> float:
    """Mean per-frame F1, written out longhand as the reference for frame_f1."""
    scores = []
    for p, y in zip(pred, Y, strict=True):
        both = int((p & y).sum())
        scores.append(1.0 if not p.any() and not y.any() else 2 * both / (p.sum() + y.sum()))
    return float(np.mean(scores))


def _accuracies(P_exit, P_final, Y, thr, lo, hi) -> tuple[float, float, float]:
    exits = exit_decides(P_exit, lo, hi)
    exit_f1 = _mean_frame_f1(exit_labels(P_exit[exits], hi), Y[exits])
    final_f1 = _mean_frame_f1(P_final[exits] > thr, Y[exits])
    return float(exits.mean()), exit_f1, final_f1


def test_calibrate_exits_the_confident_half_with_the_widest_band() -> None:
    P_exit, P_final, Y, thr = _case()
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr)
    assert (lo, hi) == (0.03, 0.95)  # just above 0.02 and just below 0.97 on the default grid
    rate, exit_acc, final_acc = _accuracies(P_exit, P_final, Y, thr, lo, hi)
    assert rate == stats["exit_rate"] == 0.5
    assert exit_acc == stats["exit_f1"] == 1.0
    assert final_acc == stats["final_f1"] == 1.0


def test_calibrate_meets_the_tolerance_and_only_it() -> None:
    P_exit, P_final, Y, thr = _case(flip=2)  # two confident frames carry one confidently wrong label
    loose = calibrate_exit(P_exit, P_final, Y, thr, tolerance=0.05)
    rate, exit_f1, final_f1 = _accuracies(P_exit, P_final, Y, thr, *loose[:2])
    assert rate == loose[2]["exit_rate"] == 0.5  # the whole confident half, wrong frames included
    assert exit_f1 == pytest.approx(loose[2]["exit_f1"]) and exit_f1 < 1.0
    assert exit_f1 >= final_f1 - 0.05
    # no tolerance: only frames whose decisions are all right may leave, so fewer exit
    strict = calibrate_exit(P_exit, P_final, Y, thr, tolerance=0.0)
    rate, exit_f1, final_f1 = _accuracies(P_exit, P_final, Y, thr, *strict[:2])
    assert 0.0 < rate == strict[2]["exit_rate"] < 0.5
    assert exit_f1 == pytest.approx(strict[2]["exit_f1"]) and exit_f1 >= final_f1 - 1e-12


def test_an_exit_that_declares_every_frame_empty_is_not_trusted() -> None:
    """Per-label accuracy would pass it (few labels per frame); per-frame F1 does not."""
    _, P_final, Y, thr = _case()
    P_exit = np.full(Y.shape, 0.01)
    old_rule_accuracy = np.mean(~Y)  # what per-label accuracy would have credited it with
    assert old_rule_accuracy > 0.6
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, tolerance=0.01)
    assert (lo, hi) == (0.0, 1.0) and stats["exit_rate"] == 0.0


def test_frame_f1_matches_the_longhand_definition() -> None:
    rng = np.random.default_rng(3)
    pred, Y = rng.random((50, 6)) < 0.3, rng.random((50, 6)) < 0.3
    assert float(frame_f1(pred, Y).mean()) == pytest.approx(_mean_frame_f1(pred, Y))


@pytest.mark.parametrize("kind", ["wrong", "shrug"])
def test_a_useless_exit_never_exits(kind: str) -> None:
    _, P_final, Y, thr = _case()
    P_exit = np.where(Y, 0.01, 0.99) if kind == "wrong" else np.full(Y.shape, 0.5)
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr)
    assert (lo, hi) == (0.0, 1.0)
    assert stats["exit_rate"] == 0.0 and math.isnan(stats["exit_f1"])
    assert not exit_decides(P_exit, lo, hi).any()


def test_calibrate_uses_the_given_grid() -> None:
    P_exit, P_final, Y, thr = _case()
    lo, hi, _ = calibrate_exit(P_exit, P_final, Y, thr, grid=(0.1, 0.2, 0.8, 0.9))
    assert (lo, hi) == (0.1, 0.9)
    assert DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0


def test_calibrate_rejects_bad_inputs() -> None:
    P_exit, P_final, Y, thr = _case()
    with pytest.raises(ValueError, match=r"P_final has shape \(200, 4\)"):
        calibrate_exit(P_exit, P_final[:, :4], Y, thr)
    with pytest.raises(ValueError, match=r"class_thr has shape \(4,\); expected \(5,\)"):
        calibrate_exit(P_exit, P_final, Y, thr[:4])
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_exit(P_exit, P_final, Y, thr, tolerance=-0.1)
    P_exit[0, 0] = np.nan
    with pytest.raises(ValueError, match="P_exit holds nan"):
        calibrate_exit(P_exit, P_final, Y, thr)


def test_global_threshold_maximises_frame_f1_for_every_class_alike() -> None:
    Y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    P = np.array([[0.30, 0.10, 0.05], [0.12, 0.35, 0.02], [0.15, 0.05, 0.20], [0.40, 0.33, 0.01]])
    t = global_threshold(Y, P)
    assert 0.20 <= t < 0.30  # above every negative (max 0.20), below every positive (min 0.30)
    assert frame_f1(t < P, Y).mean() == 1.0
    nothing = global_threshold(np.zeros((2, 3), dtype=bool), P[:2])
    assert 0.35 < nothing < 1.0  # nothing present: no labels, but never a class blind by construction


def test_decision_thresholds_are_per_class_only_where_positives_suffice() -> None:
    rng = np.random.default_rng(1)
    Y = np.zeros((200, 3), dtype=bool)
    Y[:120, 0] = True  # 120 positives: its own threshold
    Y[:3, 1] = True  # 3 positives: the global threshold
    P = np.where(Y, 0.6, 0.2) + rng.uniform(-0.05, 0.05, Y.shape)
    P[:3, 1] = 0.9  # a per-class fit would sit between 0.25 and 0.9
    thr = decision_thresholds(Y, P, min_positives=100)
    assert thr[0] == pytest.approx(class_thresholds(Y, P)[0])
    assert thr[1] == thr[2] == global_threshold(Y, P)
    assert (decision_thresholds(Y, P, min_positives=0) == class_thresholds(Y, P)).all()


# --- the held-out bound: mAP and F1 cost against the final classifier, checked on other videos ---

VIDEOS, PER_VIDEO = 8, 25


def _videos(K: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (F, K) whose frames come in videos of near-identical label sets, and the video of each frame."""
    rng = np.random.default_rng(seed)
    base = rng.random((VIDEOS, K)) < 0.35
    Y = np.repeat(base, PER_VIDEO, axis=0) ^ (rng.random((VIDEOS * PER_VIDEO, K)) < 0.05)
    return Y, np.repeat(np.arange(VIDEOS), PER_VIDEO)


def _costs(P_exit, P_final, Y, thr, rows) -> tuple[float, float]:
    """mAP cost and F1 cost of letting the exit answer every frame in `rows` (longhand)."""
    Y, Pe, Pf = Y[rows], P_exit[rows], P_final[rows]
    map_cost = mean_average_precision(Y, Pf)[0] - mean_average_precision(Y, Pe)[0]
    f1_cost = _mean_frame_f1(Pf > thr, Y) - _mean_frame_f1(Pe > 0.5, Y)
    return map_cost, f1_cost


def test_an_exit_within_f1_tolerance_that_costs_map_answers_nothing() -> None:
    """Confident and right on every label but a rare class, which it confidently misses: a miss in a frame
    of four labels costs little F1, but the rare class's AP, and so mAP (a mean over classes), falls."""
    Y, groups = _videos()
    Y[:, 4] = False
    rare = np.arange(VIDEOS) * PER_VIDEO + 3  # one frame in each video
    Y[rare] = True
    Y[rare, 3] = False
    P_final = np.where(Y, 0.9, 0.1)
    P_exit = np.where(Y, 0.97, 0.02)
    P_exit[rare[::3], 4] = 0.02  # missed in videos 0, 3 and 6: in both folds (videos alternate)
    thr = np.full(5, 0.5)
    for fold in (groups % 2 == 0, groups % 2 == 1):
        map_cost, f1_cost = _costs(P_exit, P_final, Y, thr, fold)
        assert f1_cost <= 0.01 < map_cost  # within tolerance in F1, over it in mAP
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, tolerance=0.01, groups=groups)
    assert (lo, hi) == (0.0, 1.0) and stats["exit_rate"] == 0.0
    # a tolerance above that mAP cost lets it answer every frame
    assert calibrate_exit(P_exit, P_final, Y, thr, tolerance=0.1, groups=groups)[2]["exit_rate"] == 1.0


def test_an_exit_within_map_tolerance_that_costs_f1_answers_nothing() -> None:
    """Ranks every class perfectly, but is over-confident: a fifth of the frames carry a spurious label
    just above hi (0.97, below every true label's 0.99), so mAP is untouched and the label sets are wrong."""
    Y, groups = _videos(seed=1)
    P_final = np.where(Y, 0.9, 0.1)
    P_exit = np.where(Y, 0.99, 0.02)
    spurious = np.flatnonzero(np.arange(len(Y)) % 5 == 0)
    k = np.argmin(Y[spurious], axis=1)  # the first absent class of each such frame
    assert not Y[spurious, k].any()
    P_exit[spurious, k] = 0.97
    thr = np.full(5, 0.5)
    grid = (0.05, 0.5, 0.95)  # no hi between 0.97 and 0.99 that would drop the spurious labels
    for fold in (groups % 2 == 0, groups % 2 == 1):
        map_cost, f1_cost = _costs(P_exit, P_final, Y, thr, fold)
        assert map_cost <= 1e-12 and f1_cost > 0.01
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, groups=groups, grid=grid)
    assert (lo, hi) == (0.0, 1.0) and stats["exit_rate"] == 0.0
    assert not exit_decides(P_exit, lo, hi).any()


def test_a_cost_within_tolerance_on_average_but_not_on_held_out_videos_is_refused() -> None:
    """Spurious labels (ranked below every true one, so mAP is untouched) gathered in two videos of one fold:
    over all frames the F1 cost is within the tolerance, so choosing and checking on the same frames would
    let it answer everything; on the fold holding those videos it is twice that, so it answers nothing."""
    Y, groups = _videos(seed=2)
    P_final = np.where(Y, 0.9, 0.1)
    P_exit = np.where(Y, 0.99, 0.02)
    bad = np.flatnonzero(np.isin(groups, (1, 3)))[::10][:5]  # 5 frames in videos 1 and 3 (fold 1)
    P_exit[bad] = np.where(Y[bad], 0.99, 0.97)  # every absent class declared present
    thr = np.full(5, 0.5)
    grid = (0.05, 0.5, 0.95)
    map_all, f1_all = _costs(P_exit, P_final, Y, thr, slice(None))
    map_fold, f1_fold = _costs(P_exit, P_final, Y, thr, groups % 2 == 1)
    assert map_all <= 1e-12 and map_fold <= 1e-12
    assert f1_all <= 0.01 < f1_fold
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, groups=groups, tolerance=0.01, grid=grid)
    assert stats["exit_rate"] == 0.0 and (lo, hi) == (0.0, 1.0)
    assert _costs(P_exit, P_final, Y, thr, groups % 2 == 0)[1] == 0.0  # the other fold is clean
    # held out by frame (every frame its own video), both halves share the bad videos and it passes
    assert calibrate_exit(P_exit, P_final, Y, thr, tolerance=0.01, grid=grid)[2]["exit_rate"] == 1.0


def test_a_good_exit_still_answers_most_frames_and_reports_its_held_out_cost() -> None:
    """Centred exit, confident and right on 85 % of frames, unsure on the rest; the final classifier's
    thresholds are 0.3, so the exit's scores are mixed in on the final's scale (``final_scale``)."""
    rng = np.random.default_rng(4)
    Y, groups = _videos(K=12, seed=4)
    F, K = Y.shape
    P_final = np.where(Y, rng.uniform(0.2, 0.95, Y.shape), rng.uniform(0.01, 0.45, Y.shape))
    thr = np.full(K, 0.3)
    P_exit = np.where(Y, rng.uniform(0.97, 0.999, Y.shape), rng.uniform(0.001, 0.03, Y.shape))
    unsure = rng.random(F) < 0.15
    P_exit[unsure] = rng.uniform(0.2, 0.8, (unsure.sum(), K))
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, groups=groups, centred=True)
    exits = exit_decides(P_exit, lo, hi)
    assert stats["exit_rate"] == exits.mean() >= 0.8
    assert stats["folds"] == 2 and stats["check_frames"] == F // 2
    assert stats["map_cost"] <= 0.01 and stats["f1_cost"] <= 0.01
    # the check cost is measured as the engine publishes: the exit's scores on the final's scale where it
    # answers, the final's elsewhere, on one half of the videos
    mixed = np.where(exits[:, None], final_scale(P_exit, thr), P_final)
    halves = [groups % 2 == h for h in (0, 1)]
    costs = [
        mean_average_precision(Y[r], P_final[r])[0] - mean_average_precision(Y[r], mixed[r])[0]
        for r in halves
    ]
    assert (
        any(stats["map_cost"] == pytest.approx(c) for c in costs) and max(costs) < 0
    )  # the exit ranks better
    assert stats["check_exit_rate"] in [exits[r].mean() for r in halves]


def test_one_video_has_nothing_to_hold_out_so_its_exit_never_answers() -> None:
    """One video alone: nothing to hold out, so the exit never answers, however good it is."""
    P_exit, P_final, Y, thr = _case()
    assert calibrate_exit(P_exit, P_final, Y, thr, groups=np.zeros(len(Y)))[:2] == (0.0, 1.0)
    assert calibrate_exit(P_exit, P_final, Y, thr, groups=np.arange(len(Y)) % 2)[2]["exit_rate"] == 0.5
    with pytest.raises(ValueError, match=r"groups has shape \(3,\)"):
        calibrate_exit(P_exit, P_final, Y, thr, groups=np.zeros(3))
    with pytest.raises(ValueError, match="folds"):
        calibrate_exit(P_exit, P_final, Y, thr, folds=1)


def test_final_scale_undoes_centring() -> None:
    # centring on the final's thresholds and mapping back is the identity; p = 0.5 lands on the threshold
    t = np.array([0.05, 0.3, 0.5, 0.9])
    p = np.array([[0.01, 0.2, 0.5, 0.95], [0.5, 0.5, 0.5, 0.5]])
    assert final_scale(centre(p, logit_offsets(t)), t) == pytest.approx(p)
    assert final_scale(p[1:], t)[0] == pytest.approx(t)


def test_recall_thresholds_keep_the_target_share_of_each_class_and_pool_the_few() -> None:
    # class 0: 10 positives scored 0.91..1.0, negatives 0.05..0.5; keeping 0.9 keeps the 9 best positives:
    # the cut sits halfway between the 9th (0.92) and the next lower score (0.91, the 10th positive)
    pos0 = np.linspace(1.0, 0.91, 10)
    neg0 = np.linspace(0.5, 0.05, 10)
    # class 1: 3 positives (under min_positives), class 2: none
    s1 = np.array([0.8, 0.6, 0.3, *np.full(17, 0.1)])
    Y = np.zeros((20, 3), dtype=bool)
    Y[:10, 0] = True
    Y[:3, 1] = True
    P = np.stack([np.concatenate([pos0, neg0]), s1, np.full(20, 0.2)], axis=1)
    cuts, pooled = recall_thresholds(Y, P, recall=0.9, min_positives=5)
    assert cuts[0] == pytest.approx(0.5 * (0.92 + 0.91))
    # pooled over all 13 positives: keep ceil(0.9 * 13) = 12, i.e. all but the lowest (0.3); the 12th is 0.6
    # and the next lower score in the pooled set is 0.5
    assert pooled == pytest.approx(0.55) and cuts[1] == cuts[2] == pytest.approx(0.55)
    # exactly the target recall on the calibration data, where the class has its own cut
    assert (P[Y[:, 0], 0] > cuts[0]).mean() == pytest.approx(0.9)
    # recall 1 keeps every positive: below the lowest one (0.91), above the highest negative (0.5)
    full, _ = recall_thresholds(Y, P, recall=1.0, min_positives=5)
    assert full[0] == pytest.approx(0.5 * (0.91 + 0.5)) and (P[Y[:, 0], 0] > full[0]).all()
    none, pooled0 = recall_thresholds(
        np.zeros((4, 2), bool), np.full((4, 2), 0.3), recall=0.9, min_positives=1
    )
    assert pooled0 == 0.0 and (none == 0.0).all()  # nothing known: every score counts
    for kw, msg in (
        ({"recall": 0.0, "min_positives": 1}, "recall"),
        ({"recall": 0.9, "min_positives": 0}, "min_pos"),
    ):
        with pytest.raises(ValueError, match=msg):
            recall_thresholds(Y, P, **kw)


def _videos_case(concentrated: bool) -> tuple[np.ndarray, ...]:
    """20 videos of 10 frames; the exit is right except for 8 frames with one confidently wrong label (a
    third of their F1 each), one per video in 8 videos or 4 in each of two videos (one per fold)."""
    rng = np.random.default_rng(0)
    V, n, K = 20, 10, 5
    Y = rng.random((V * n, K)) < 0.3
    Y[:, 0] = rng.random(V * n) < 0.9  # a common class: 8 false positives barely move its AP
    groups = np.repeat(np.arange(V), n)
    two = [np.flatnonzero(groups == v)[:4] for v in (0, 1)]
    rows = np.concatenate(two) if concentrated else np.arange(8) * n
    Y[rows] = False
    Y[rows, 1] = True
    P_exit, P_final = np.where(Y, 0.97, 0.02), np.where(Y, 0.9, 0.1)
    P_exit[rows, 0] = 0.97
    return P_exit, P_final, Y, np.full(K, 0.5), groups


@pytest.mark.parametrize("concentrated", [False, True])
def test_an_upper_bound_on_the_cost_refuses_an_exit_whose_mistakes_sit_in_few_videos(concentrated) -> None:
    """The same mean F1 cost (0.013, within the 0.025 tolerance) passes with its mean alone either way; with
    1.645 standard errors over videos it passes where mistakes are spread and fails where two videos hold
    them all: there the mean says little about the next video."""
    P_exit, P_final, Y, thr, groups = _videos_case(concentrated)
    assert frame_f1(P_final > thr, Y).mean() - frame_f1(P_exit > 0.5, Y).mean() == pytest.approx(8 / 3 / 200)
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, groups=groups, tolerance=0.025)
    assert stats["exit_rate"] == 1.0 and stats["f1_cost"] == pytest.approx(8 / 3 / 200)
    lo, hi, stats = calibrate_exit(P_exit, P_final, Y, thr, groups=groups, tolerance=0.025, confidence=1.645)
    assert stats["exit_rate"] == (0.0 if concentrated else 1.0)
    if concentrated:
        assert (lo, hi) == (0.0, 1.0)


def test_a_negative_confidence_is_refused_with_its_value() -> None:
    P_exit, P_final, Y, thr = _case()
    with pytest.raises(ValueError, match=r"confidence must be >= 0 .*got -1"):
        calibrate_exit(P_exit, P_final, Y, thr, confidence=-1.0)
