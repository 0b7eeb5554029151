"""Calibration of the early-exit rule (exitrule.py) and of the decision thresholds (SL-ViT, arXiv 2105.09121).

A frame stops at an exit when every class is decided confidently there: its probability is below `lo`
(absent) or above `hi` (present). (lo, hi) are chosen on validation data so that, on the frames that
exit, the exit's decisions are as accurate as the final classifier's, to a tolerance. Accuracy is the
per-frame F1 of the decided label set against the truth (an empty set matching an empty truth scores 1):
per-label accuracy would reward an exit that declares every frame empty, since few of many classes are
present in any frame. Torch-free; training calibrates, the daemon applies exitrule.py per frame.
"""

from __future__ import annotations

import numpy as np

from polymorphd.models.core.exitrule import THRESHOLD_EPS
from polymorphd.models.core.metrics import frame_f1

__all__ = [
    "DEFAULT_GRID",
    "calibrate_exit",
    "centre",
    "class_thresholds",
    "decision_thresholds",
    "global_threshold",
    "logit_offsets",
]

# Candidate values for lo and hi: dense near 0 and 1, where confident exits live.
DEFAULT_GRID: tuple[float, ...] = (
    *(0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45),
    *(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.9975),
    *(0.999, 1.0),
)


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


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def logit_offsets(thresholds: np.ndarray) -> np.ndarray:
    """Per-class logit(t): subtracting it from an exit's logits puts each class's threshold at p = 0.5."""
    return _logit(np.asarray(thresholds, dtype=np.float64), THRESHOLD_EPS)


def centre(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Probabilities (F, K) as the exit centred by ``offsets`` gives them: sigmoid(logit(p) - offset)."""
    return 1.0 / (1.0 + np.exp(offsets - _logit(np.asarray(probs, dtype=np.float64), 1e-6)))


def calibrate_exit(
    P_exit: np.ndarray,
    P_final: np.ndarray,
    Y: np.ndarray,
    class_thr: np.ndarray,
    *,
    tolerance: float = 0.01,
    grid: tuple[float, ...] | np.ndarray = DEFAULT_GRID,
) -> tuple[float, float, dict[str, float]]:
    """Choose the exit's (lo, hi) from `grid` (lo <= hi) maximising the share of frames that exit.

    Constraint: on the exiting frames, the exit's mean per-frame F1 (p > hi present, p < lo absent) vs
    Y is at least the final classifier's (P_final > class_thr) on the same frames minus `tolerance`.
    Ties prefer the larger F1 margin, then the wider (lo, hi) band. Returns lo, hi and
    {"exit_rate", "exit_f1", "final_f1"} (mean F1 on the exiting frames; nan when none exits).
    (0.0, 1.0), which never exits, when no pair qualifies.
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
    values = np.unique(np.asarray(grid, dtype=np.float64))
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"grid must hold finite candidate thresholds, got {grid!r}")

    never = {"exit_rate": 0.0, "exit_f1": float("nan"), "final_f1": float("nan")}
    if F == 0 or K == 0:
        return 0.0, 1.0, never
    final_score = frame_f1(Pf > thr, Yb)  # (F,)
    sorted_exit = np.sort(Pe, axis=1)
    best_key: tuple[float, float, float] | None = None
    best: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)
    for lo in values:
        below = Pe < lo  # (F, K): decided absent when the frame exits
        n_below = below.sum(axis=1)
        # a frame exits at (lo, hi) iff its smallest probability >= lo is above hi
        nxt = np.where(n_below < K, sorted_exit[np.arange(F), np.minimum(n_below, K - 1)], np.inf)
        # when a frame exits, no probability is in [lo, hi], so "p > hi" equals "p >= lo"
        exit_score = frame_f1(~below, Yb)
        his = values[values >= lo]
        exits = nxt[:, None] > his[None, :]  # (F, H)
        n_exit = exits.sum(axis=0)
        e_sum = exit_score @ exits
        f_sum = final_score @ exits
        ok = (n_exit > 0) & (e_sum - f_sum >= -tolerance * n_exit - 1e-9)
        for j in np.flatnonzero(ok):
            margin = (e_sum[j] - f_sum[j]) / n_exit[j]
            key = (float(n_exit[j]), float(margin), float(his[j] - lo))
            if best_key is None or key > best_key:
                best_key = key
                best = (float(lo), float(his[j]), e_sum[j] / n_exit[j], f_sum[j] / n_exit[j])
    if best_key is None:
        return 0.0, 1.0, never
    lo, hi, exit_f1, final_f1 = best
    return lo, hi, {"exit_rate": best_key[0] / F, "exit_f1": exit_f1, "final_f1": final_f1}
