"""The early-exit rule for multi-label frames (SL-ViT, arXiv 2105.09121; DESIGN.md). Torch-free, pure numpy.

A frame stops at an exit when every class is decided confidently there: its probability is below ``lo``
(absent) or above ``hi`` (present). The daemon applies it per frame; calibrate.py chooses (lo, hi).
"""

from __future__ import annotations

import numpy as np

__all__ = ["THRESHOLD_EPS", "exit_decides", "exit_labels"]

# thresholds are clipped to [eps, 1 - eps] before their logit or odds are taken (exit centring, the engine's
# mapping of centred exit scores back onto the final classifier's scale)
THRESHOLD_EPS = 1e-4


def exit_decides(probs: np.ndarray, lo: float, hi: float) -> bool | np.ndarray:
    """True where every class is < lo or > hi: probs (K,) -> bool, (F, K) -> (F,) bool."""
    p = np.asarray(probs)
    undecided = (p >= lo) & (p <= hi)
    if p.ndim == 1:
        return not undecided.any()
    return ~undecided.any(axis=-1)


def exit_labels(probs: np.ndarray, hi: float) -> np.ndarray:
    """The exit's label mask: probs > hi (same shape as probs)."""
    return np.asarray(probs) > hi
