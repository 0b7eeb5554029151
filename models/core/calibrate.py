"""Calibration of the early-exit rule (exitrule.py) and of the decision thresholds (SL-ViT, arXiv 2105.09121).

A frame stops at an exit when every class is decided confidently there: its probability is below `lo`
(absent) or above `hi` (present). (lo, hi) are chosen on validation data so that answering at the exit
costs at most a tolerance against the final classifier, in mAP and in label F1, on videos held out from
the choice (``calibrate_exit`` says how and why). Label accuracy is the per-frame F1 of the decided
label set against the truth (an empty set matching an empty truth scores 1): per-label accuracy would
reward an exit that declares every frame empty, since few of many classes are present in any frame.
Torch-free; training calibrates, the daemon applies exitrule.py per frame.
"""

from __future__ import annotations

import numpy as np

from polymorphd.models.core.exitrule import THRESHOLD_EPS
from polymorphd.models.core.metrics import frame_f1, mean_average_precision

__all__ = [
    "DEFAULT_GRID",
    "calibrate_exit",
    "centre",
    "class_thresholds",
    "decision_thresholds",
    "final_scale",
    "global_threshold",
    "logit_offsets",
    "recall_thresholds",
]

# Candidate values for lo and hi: dense near 0 and 1, where confident exits live.
DEFAULT_GRID: tuple[float, ...] = (
    *(0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45),
    *(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.9975),
    *(0.999, 1.0),
)


_SLACK = 1e-9  # float sums of equal F1s / mAPs must not fail a zero tolerance


def _check_pair(name: str, A: np.ndarray, Y: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.shape != Y.shape or A.ndim != 2:
        raise ValueError(
            f"{name} has shape {A.shape}; expected (frames, classes) = {Y.shape} like the labels"
        )
    if not np.isfinite(A).all():
        raise ValueError(f"{name} holds nan or inf; check the model outputs")
    return A


def _labels(Y: np.ndarray) -> np.ndarray:
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"labels must be 2-D (frames, classes), got shape {Y.shape}")
    if Y.dtype != bool and Y.size and not np.isin(Y, (0, 1)).all():
        raise ValueError("labels must hold only 0/1 (or bool)")
    return Y.astype(bool, copy=False)


def class_thresholds(Y: np.ndarray, P: np.ndarray, *, default: float = 0.5) -> np.ndarray:
    """Per-class threshold t (predict present when p > t) maximising F1 on validation Y (F, K), P (F, K).

    The threshold sits halfway between the lowest score kept and the next lower score, so it generalises
    rather than sitting on a validation sample. Ties in F1 go to the higher threshold. `default` where a
    class has no positive.
    """
    Yb = _labels(Y)
    Pf = _check_pair("P", P, Yb)
    F, K = Yb.shape
    out = np.full(K, float(default))
    n_pos = Yb.sum(axis=0)
    for k in np.flatnonzero(n_pos):
        order = np.argsort(-Pf[:, k], kind="stable")
        s, y = Pf[order, k], Yb[order, k]
        ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last row of each tie group
        tp = np.cumsum(y)[ends]
        f1 = 2.0 * tp / (ends + 1 + n_pos[k])  # 2TP / (2TP + FP + FN), predicted = ends + 1
        best = int(np.argmax(f1))
        i = ends[best]
        if i + 1 < F:
            out[k] = 0.5 * (s[i] + s[i + 1])
        else:  # every frame predicted present: go below the lowest score
            out[k] = 0.5 * s[i] if s[i] > 0 else float(np.nextafter(s[i], -np.inf))
    return out


def global_threshold(Y: np.ndarray, P: np.ndarray) -> float:
    """The one threshold, for every class alike, maximising mean per-frame F1 of (P > t) against Y.

    Candidates: DEFAULT_GRID inside (0, 1) plus every 0.01; ties go to the higher threshold (fewer labels)."""
    Yb = _labels(Y)
    Pf = _check_pair("P", P, Yb)
    grid = np.unique(np.concatenate([DEFAULT_GRID, np.linspace(0.01, 0.99, 99)]))
    grid = grid[(grid > 0.0) & (grid < 1.0)]  # 0 and 1 would make every class always or never present
    scores = [frame_f1(Pf > t, Yb).mean() if Yb.size else 0.0 for t in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], grid[i]))
    return float(grid[best])


def decision_thresholds(Y: np.ndarray, P: np.ndarray, *, min_positives: int) -> np.ndarray:
    """Per-class F1 thresholds (``class_thresholds``) for classes with at least ``min_positives`` positive
    frames, the ``global_threshold`` for the rest.

    A per-class threshold fit on a handful of positives does not transfer: on the default synthetic dataset
    (6 calibration videos, a median of 0 positives per class) per-class thresholds scored frame F1 0.51 on
    calibration and 0.20 on test, one global threshold 0.27 on both (small run's final classifier).
    """
    Yb = _labels(Y)
    per_class = class_thresholds(Yb, P)
    return np.where(Yb.sum(axis=0) >= min_positives, per_class, global_threshold(Yb, P))


def _recall_cut(scores: np.ndarray, positives: np.ndarray, recall: float) -> float:
    """The highest t with (scores > t) keeping ``recall`` of the positives: halfway between the last positive
    that must stay and the next lower score (as ``class_thresholds`` places its cut), 0 below them all."""
    pos = np.sort(scores[positives])[::-1]
    kept = pos[max(1, int(np.ceil(recall * pos.size - 1e-9))) - 1]
    lower = scores[scores < kept]
    return float(0.5 * (kept + lower.max())) if lower.size else float(0.5 * kept)


def recall_thresholds(
    Y: np.ndarray, P: np.ndarray, *, recall: float, min_positives: int
) -> tuple[np.ndarray, float]:
    """Per-class thresholds t_k on scores P (F, K) that keep ``recall`` of each class's positive frames
    (p > t_k), for the context policy's likely set: the tightest cut that still finds the frame's labels.

    Classes with fewer than ``min_positives`` positive frames get one global threshold, the cut that keeps
    ``recall`` of all positives of all classes pooled (as ``decision_thresholds`` falls back to one global
    F1 threshold); it is also returned. Where no class has a positive, the global value is 0 (every score
    counts: nothing is known). Ties: a score equal to the kept positive's is always kept.
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    if min_positives < 1:
        raise ValueError(f"min_positives must be >= 1, got {min_positives}")
    Yb = _labels(Y)
    Pf = _check_pair("P", P, Yb)
    n_pos = Yb.sum(axis=0)
    pooled = _recall_cut(Pf.ravel(), Yb.ravel(), recall) if n_pos.any() else 0.0
    out = np.full(Yb.shape[1], pooled)
    for k in np.flatnonzero(n_pos >= min_positives):
        out[k] = _recall_cut(Pf[:, k], Yb[:, k], recall)
    return out, pooled


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def logit_offsets(thresholds: np.ndarray) -> np.ndarray:
    """Per-class logit(t): subtracting it from an exit's logits puts each class's threshold at p = 0.5."""
    return _logit(np.asarray(thresholds, dtype=np.float64), THRESHOLD_EPS)


def centre(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Probabilities (F, K) as the exit centred by ``offsets`` gives them: sigmoid(logit(p) - offset)."""
    return 1.0 / (1.0 + np.exp(offsets - _logit(np.asarray(probs, dtype=np.float64), 1e-6)))


def final_scale(probs: np.ndarray, class_thr: np.ndarray) -> np.ndarray:
    """A centred exit's probabilities (F, K) on the final classifier's scale, as the engine publishes them
    (daemon/modes.py): sigmoid(logit(p) + logit(t_k)), t_k the final classifier's thresholds, in odds form."""
    t = np.clip(np.asarray(class_thr, dtype=np.float64), THRESHOLD_EPS, 1.0 - THRESHOLD_EPS)
    p = np.asarray(probs, dtype=np.float64)
    num = p * (t / (1.0 - t))
    return num / (num + (1.0 - p))


def _videos(groups: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per frame its video (F,) as an index 0..V-1, per video its fold (V,), and the number of folds: videos
    dealt alternately, in order of first frame."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # video number by first appearance
    k = min(folds, len(first))
    return inverse.ravel(), rank % max(k, 1), k


def _folds(groups: np.ndarray, folds: int) -> tuple[np.ndarray, int]:
    """Per frame its fold (F,) and the number of folds (``_videos``)."""
    video, video_fold, k = _videos(groups, folds)
    return video_fold[video], k


def _candidates(
    Pe: np.ndarray, Yb: np.ndarray, final_score: np.ndarray, values: np.ndarray, onehot: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every grid pair lo <= hi: lo (M,), hi (M,), exit masks (F, M), and per group of ``onehot`` (F, G), a
    video, (G, M) the number of exiting frames and the sums of the exit's and the final classifier's
    per-frame F1 over them."""
    F, K = Yb.shape
    sorted_exit = np.sort(Pe, axis=1)
    lo_c, hi_c, masks, n, e, f = [], [], [], [], [], []
    w = onehot.astype(np.float64)  # (F, k)
    for lo in values:
        below = Pe < lo  # (F, K): decided absent when the frame exits
        n_below = below.sum(axis=1)
        # a frame exits at (lo, hi) iff its smallest probability >= lo is above hi
        nxt = np.where(n_below < K, sorted_exit[np.arange(F), np.minimum(n_below, K - 1)], np.inf)
        # when a frame exits, no probability is in [lo, hi], so "p > hi" equals "p >= lo"
        exit_score = frame_f1(~below, Yb)
        his = values[values >= lo]
        exits = nxt[:, None] > his[None, :]  # (F, H)
        lo_c.append(np.full(his.size, lo))
        hi_c.append(his)
        masks.append(exits)
        n.append(w.T @ exits)
        e.append((w * exit_score[:, None]).T @ exits)
        f.append((w * final_score[:, None]).T @ exits)
    cat = np.concatenate
    return cat(lo_c), cat(hi_c), cat(masks, axis=1), cat(n, axis=1), cat(e, axis=1), cat(f, axis=1)


def _f1_ok(n: np.ndarray, e: np.ndarray, f: np.ndarray, tolerance: float, confidence: float) -> np.ndarray:
    """Per candidate (M,): the F1 cost of answering at the exit, final minus exit on the exiting frames of
    the videos in n, e, f (V, M; ``_candidates``' sums), is within ``tolerance``: its mean plus
    ``confidence`` standard errors, the errors over videos (a cluster-robust ratio estimate: frames of one
    video are near copies, so they are not independent samples). Where no frame exits the cost is 0."""
    N, D = n.sum(0), (e - f).sum(0)
    mean = D / np.maximum(N, 1)
    if confidence > 0:
        used = (n > 0).sum(0)
        resid = ((e - f) - mean[None, :] * n) ** 2
        se = np.sqrt(resid.sum(0) * used / np.maximum(used - 1, 1)) / np.maximum(N, 1)
        se = np.where(used > 1, se, np.inf)  # one video says nothing of the spread: no bound
        se = np.where(N > 0, se, 0.0)
    else:
        se = np.zeros_like(mean)
    return -mean + confidence * se <= tolerance + _SLACK


class _MapCost:
    """mAP(final everywhere) - mAP(exit's scores where it exits, final's elsewhere) on a set of folds,
    cached per distinct exit mask (many grid pairs exit exactly the same frames)."""

    def __init__(
        self, Y: np.ndarray, P_final: np.ndarray, P_mix: np.ndarray, fold: np.ndarray, exits: np.ndarray
    ):
        self.Y, self.Pf, self.Pm, self.fold, self.exits = Y, P_final, P_mix, fold, exits
        _, same = np.unique(np.packbits(exits, axis=0), axis=1, return_inverse=True)
        self.same = same.ravel()
        self.cache: dict[tuple[tuple[int, ...], int], float] = {}
        self.base: dict[tuple[int, ...], float] = {}

    def __call__(self, part: tuple[int, ...], m: int) -> float:
        key = (part, int(self.same[m]))
        if key not in self.cache:
            rows = np.isin(self.fold, part)
            Y, Pf = self.Y[rows], self.Pf[rows]
            if part not in self.base:
                self.base[part] = mean_average_precision(Y, Pf)[0]
            mixed = np.where(self.exits[rows, m][:, None], self.Pm[rows], Pf)
            cost = self.base[part] - mean_average_precision(Y, mixed)[0]
            self.cache[key] = 0.0 if np.isnan(cost) else float(cost)  # nan: no positive to rank
        return self.cache[key]


def calibrate_exit(
    P_exit: np.ndarray,
    P_final: np.ndarray,
    Y: np.ndarray,
    class_thr: np.ndarray,
    *,
    tolerance: float = 0.01,
    grid: tuple[float, ...] | np.ndarray = DEFAULT_GRID,
    groups: np.ndarray | None = None,
    folds: int = 2,
    centred: bool = False,
    confidence: float = 0.0,
) -> tuple[float, float, dict[str, float]]:
    """Choose the exit's (lo, hi) from `grid` (lo <= hi): the most frames exiting such that, on frames not
    used to rank the pair, answering there costs at most `tolerance` in mAP and in label F1.

    Frames are split by video (`groups`, a video id per frame; None: every frame its own video) into
    `folds` folds, videos dealt alternately. For each fold, pairs are ranked on the other folds (the
    choice) by exit rate, then F1 margin, then the wider band, and the first pair that passes both checks
    on the choice AND on the held-out fold (the check) is that fold's pick; the pick with the fewest exits
    on all frames is kept (the stricter). A pair passes on a set of frames when
    - F1: on its exiting frames, the exit's mean per-frame F1 (p > hi present, p < lo absent) is at least
      the final classifier's (P_final > class_thr) minus `tolerance`, by an upper bound on the cost: the
      mean plus `confidence` standard errors over videos (0: the mean alone);
    - mAP: mAP(exit's scores where it exits, the final's elsewhere) >= mAP(final everywhere) - `tolerance`,
      the exit's scores on the final's scale as the engine publishes them (``final_scale``) when `centred`.
    No pick in some fold (or fewer than two videos, nothing to hold out): (0.0, 1.0), never exits.

    Why a bound and not the mean: the pick is the pair with the most exits among those that pass, so it
    sits at the tolerance's edge, and its cost on unseen videos is above the mean it passed with (`small`
    from the longer pretrain: 0.009 F1 on the held-out fold, 0.026 on 48 test videos; docs/ARCHITECTURE.md,
    "Exits bounded by an upper confidence bound").

    Why: fit and judged on the same 6 calibration videos by F1 alone, the first exit answered 100 % of
    test frames at -2.3 to -3.7 mAP (issue 10). F1 says nothing of ranking, so an exit whose labels are
    as right as the final's can still lose mAP, and the reverse; and a pair at the edge of the tolerance
    on the videos it was fit on crosses it on others. Frames of one video are near copies, so holding out
    frames rather than videos would check nothing.

    Returns lo, hi and {"exit_rate", "exit_f1", "final_f1"} on all frames (mean F1 on the exiting frames;
    nan when none exits) plus, on the winning pick's held-out fold, "map_cost", "f1_cost" (final minus
    exit; > 0 is a loss), "check_exit_rate", "check_frames"; and "folds".
    """
    Yb = _labels(Y)
    Pe = _check_pair("P_exit", P_exit, Yb)
    Pf = _check_pair("P_final", P_final, Yb)
    thr = np.asarray(class_thr, dtype=np.float64)
    F, K = Yb.shape
    if thr.shape != (K,):
        raise ValueError(f"class_thr has shape {thr.shape}; expected ({K},), one threshold per class")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if confidence < 0:
        raise ValueError(f"confidence must be >= 0 (standard errors added to the cost), got {confidence}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2 (choose on some videos, check on others), got {folds}")
    values = np.unique(np.asarray(grid, dtype=np.float64))
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"grid must hold finite candidate thresholds, got {grid!r}")
    g = np.arange(F) if groups is None else np.asarray(groups)
    if g.shape != (F,):
        raise ValueError(f"groups has shape {g.shape}; expected ({F},), one video id per frame")

    never = {"exit_rate": 0.0, "exit_f1": float("nan"), "final_f1": float("nan"), "map_cost": 0.0}
    never |= {"f1_cost": 0.0, "check_exit_rate": 0.0, "check_frames": 0, "folds": 0}
    if F == 0 or K == 0:
        return 0.0, 1.0, never
    video, video_fold, k = _videos(g, folds)
    if k < 2:
        return 0.0, 1.0, never
    fold = video_fold[video]
    onehot = fold[:, None] == np.arange(k)[None, :]
    per_video = video[:, None] == np.arange(video_fold.size)[None, :]
    lo_c, hi_c, exits, n_v, e_v, f_v = _candidates(Pe, Yb, frame_f1(Pf > thr, Yb), values, per_video)
    n, e, f = (np.stack([x[video_fold == j].sum(0) for j in range(k)]) for x in (n_v, e_v, f_v))
    map_cost = _MapCost(Yb, Pf, final_scale(Pe, thr) if centred else Pe, fold, exits)

    picks = []
    for h in range(k):
        n_c, e_c, f_c = n.sum(0) - n[h], e.sum(0) - e[h], f.sum(0) - f[h]
        held = video_fold == h
        f1_ok = (
            (n_c > 0)
            & _f1_ok(n_v[~held], e_v[~held], f_v[~held], tolerance, confidence)
            & _f1_ok(n_v[held], e_v[held], f_v[held], tolerance, confidence)
        )
        order = np.lexsort((lo_c - hi_c, -(e_c - f_c) / np.maximum(n_c, 1), -n_c))
        choice = tuple(j for j in range(k) if j != h)
        pick = next(
            (
                int(m)
                for m in order[f1_ok[order]]
                if map_cost(choice, m) <= tolerance + _SLACK and map_cost((h,), m) <= tolerance + _SLACK
            ),
            None,
        )
        if pick is None:
            return 0.0, 1.0, never
        picks.append((h, pick))
    h, m = min(picks, key=lambda hm: (n[:, hm[1]].sum(), lo_c[hm[1]] - hi_c[hm[1]]))
    n_all, n_h, frames_h = n[:, m].sum(), n[h, m], int(onehot[:, h].sum())
    stats = {
        "exit_rate": float(n_all / F),
        "exit_f1": float(e[:, m].sum() / n_all),
        "final_f1": float(f[:, m].sum() / n_all),
        "map_cost": map_cost((h,), m),
        "f1_cost": float((f[h, m] - e[h, m]) / n_h) if n_h else 0.0,
        "check_exit_rate": float(n_h / frames_h),
        "check_frames": frames_h,
        "folds": k,
    }
    return float(lo_c[m]), float(hi_c[m]), stats
