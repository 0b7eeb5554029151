"""The exit rule for regression (count) exits, and its calibration. Torch-free, pure numpy.

A count exit answers a frame when its count is confidently near a whole number: |c - round(c)| <= margin.
The margin is calibrated like the label exits' (lo, hi) (``calibrate.calibrate_exit``): the widest margin
from a grid such that, on the frames it lets exit, the exit's mean absolute count error is at most the
final count head's plus ``tolerance`` (objects), checked on each fold of videos with the margin chosen on
the other folds, the stricter pick kept. A frame leaves at an exit with a count head only when both its
labels (``exitrule.exit_decides``) and its count are decided there.
"""

from __future__ import annotations

import numpy as np

from polymorphd.models.core.calibrate import _folds

__all__ = ["COUNT_GRID", "calibrate_count", "count_decides", "count_mae"]

COUNT_GRID = tuple(round(0.025 * i, 3) for i in range(21))  # margins 0 .. 0.5 (0.5: every frame answers)


def count_decides(count: np.ndarray | float, margin: float) -> bool | np.ndarray:
    """True where the count is within ``margin`` of a whole number."""
    c = np.asarray(count, dtype=np.float64)
    ok = np.abs(c - np.round(c)) <= margin
    return bool(ok) if ok.ndim == 0 else ok


def count_mae(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute count error (nan without frames); negative predictions count as 0, as published."""
    p, t = np.maximum(np.asarray(pred, dtype=np.float64), 0.0), np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"count predictions {p.shape} and truth {t.shape} differ in shape")
    return float(np.abs(p - t).mean()) if p.size else float("nan")


def calibrate_count(
    c_exit: np.ndarray,
    c_final: np.ndarray,
    truth: np.ndarray,
    *,
    tolerance: float = 0.05,
    grid: tuple[float, ...] = COUNT_GRID,
    groups: np.ndarray | None = None,
    folds: int = 2,
) -> tuple[float, dict[str, float]]:
    """The count exit's margin (-1.0: never answers) and {"exit_rate", "exit_mae", "final_mae"} on all frames.

    A margin passes on a set of frames when, on the frames it lets exit, MAE(exit) <= MAE(final) + tolerance.
    """
    ce, cf, t = (np.asarray(a, dtype=np.float64) for a in (c_exit, c_final, truth))
    if not ce.shape == cf.shape == t.shape or ce.ndim != 1:
        raise ValueError(
            f"c_exit {ce.shape}, c_final {cf.shape} and truth {t.shape} must be equal 1-D shapes"
        )
    if tolerance < 0:
        raise ValueError(f"count tolerance must be >= 0, got {tolerance}")
    never = {"exit_rate": 0.0, "exit_mae": float("nan"), "final_mae": float("nan")}
    g = np.arange(len(ce)) if groups is None else np.asarray(groups)
    fold, k = _folds(g, folds)
    if len(ce) == 0 or k < 2:
        return -1.0, never
    err_e, err_f = np.abs(np.maximum(ce, 0) - t), np.abs(np.maximum(cf, 0) - t)
    dist = np.abs(ce - np.round(ce))

    def passes(margin: float, rows: np.ndarray) -> bool:
        m = rows & (dist <= margin)
        return not m.any() or err_e[m].mean() <= err_f[m].mean() + tolerance + 1e-9

    picks = []
    for h in range(k):
        held = fold == h
        ok = [m for m in sorted(grid, reverse=True) if passes(m, ~held) and passes(m, held)]
        if not ok:
            return -1.0, never
        picks.append(ok[0])
    margin = float(min(picks))
    m = dist <= margin
    stats = {
        "exit_rate": float(m.mean()),
        "exit_mae": float(err_e[m].mean()) if m.any() else float("nan"),
        "final_mae": float(err_f[m].mean()) if m.any() else float("nan"),
    }
    return margin, stats
