"""Per-frame context selection and label merging (Polymorph, arXiv 2507.14959). Torch-free, no I/O.

After the last early exit, the likely labels of a frame are the labels published in the last few frames
(temporal continuity) that the exit still supports (``support``; 0 keeps them all) plus the classes the
exit scores above a high-recall threshold: the class's own cut when the bundle has per-class recall
thresholds (the manifest's ``policy.class_recall``, fit at calibration to keep a target recall of each
class on the last exit), else the single ``recall_threshold``. The contexts that
cover them (greedy set cover, at most `max_adapters`) are the adapters run in the LoRA tail. Every
`refresh_every` frames, or when the exit's view disagrees with the last labels (scene change), the likely
set widens to catch objects the exit barely sees. The knobs (``PolicyKnobs``) are defined, defaulted and
validated in ``models/core/knobs.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from polymorphd.models.core.contexts import ContextIndex
from polymorphd.models.core.knobs import PolicyKnobs

__all__ = ["ContextPolicy", "PolicyState", "Reason"]

Reason = Literal["cover", "refresh", "surprise", "empty"]


@dataclass
class PolicyState:
    """Per-stream memory of the policy: one per camera, reset on a scene cut or source restart.

    Label sets are Python sets of class indices: frames hold a handful of labels, and set operations on
    them are cheaper than numpy calls on (K,) masks.
    """

    frame: int = 0  # select() calls so far
    last_reason: Reason | None = None
    last_likely: frozenset[int] = frozenset()  # what the last cover was asked to cover
    prev_labels: frozenset[int] = frozenset()  # last observed labels
    recent: frozenset[int] = frozenset()  # union of the labels kept for continuity
    history: deque[frozenset[int]] = field(default_factory=deque)

    def reset(self) -> None:
        """Forget everything: the next frame is treated like the first one."""
        self.frame = 0
        self.last_reason = None
        self.last_likely = frozenset()
        self.prev_labels = frozenset()
        self.recent = frozenset()
        self.history.clear()


class ContextPolicy:
    """Chooses the adapters for a frame and merges their scores. One per bundle, shared by streams."""

    def __init__(
        self,
        contexts: Sequence[Sequence[int]],
        num_classes: int,
        cfg: PolicyKnobs,
        class_recall: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """``class_recall``: (K,) per-class recall thresholds on the exit's scores, used instead of
        ``cfg.recall_threshold`` (None: the single threshold, as bundles without them)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.class_recall: np.ndarray | None = None
        if class_recall is not None:
            cuts = np.asarray(class_recall, dtype=np.float32)
            if cuts.shape != (num_classes,) or not np.isfinite(cuts).all():
                raise ValueError(
                    f"class_recall has shape {cuts.shape} or a non-finite value; expected ({num_classes},) "
                    "finite thresholds, one per class"
                )
            self.class_recall = cuts
        self.index = ContextIndex.from_contexts(contexts, num_classes)
        orphans = np.flatnonzero(~self.index.member.any(axis=0))
        if orphans.size:
            raise ValueError(
                f"classes {orphans[:10].tolist()} are in no context; every class needs one (recluster)"
            )
        self.num_classes = num_classes
        self.cfg = cfg
        # (n_contexts, K) float32 membership, for the vectorised merge
        self._member_f = self.index.member.astype(np.float32)
        self._plans: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def new_state(self) -> PolicyState:
        return PolicyState()

    def _probs(self, exit_probs: np.ndarray) -> np.ndarray:
        p = np.asarray(exit_probs)
        if p.shape != (self.num_classes,):
            raise ValueError(f"exit_probs has shape {p.shape}; expected ({self.num_classes},)")
        return p

    def select(self, state: PolicyState, exit_probs: np.ndarray) -> list[int]:
        """Context indices to run for this frame (at most cfg.max_adapters, the most useful), ascending.

        Widens on the refresh_every-th, 2*refresh_every-th, ... call since the state was made or reset,
        and on a surprise (the first frame with anything likely counts as one: nothing was seen before).
        """
        cfg = self.cfg
        p = self._probs(exit_probs)
        state.frame += 1
        cut = cfg.recall_threshold if self.class_recall is None else self.class_recall
        exit_likely = set(np.flatnonzero(p > cut).tolist())
        prev = state.prev_labels
        # scene change: the exit's likely set and the last labels disagree (two empty sets agree)
        union = len(exit_likely | prev)
        surprise = union > 0 and len(exit_likely & prev) < cfg.surprise_jaccard * union
        refresh = cfg.refresh_every > 0 and state.frame % cfg.refresh_every == 0
        if surprise or refresh:
            exit_likely = set(np.flatnonzero(p > 0.5 * cut).tolist())
        recent = state.recent
        if cfg.support > 0:  # recent labels the exit no longer supports have left the scene
            recent = frozenset(c for c in recent if p[c] > cfg.support)
        likely = exit_likely | recent
        state.last_likely = frozenset(likely)
        if not likely:
            state.last_reason = "empty"
            return []
        state.last_reason = "surprise" if surprise else "refresh" if refresh else "cover"
        # labels published recently outrank exit guesses; among guesses, the more probable first
        order = sorted(likely)
        weights = {
            c: v + (1.0 if c in recent else 0.0) for c, v in zip(order, p[order].tolist(), strict=True)
        }
        # in index order: the same set is the same tuple, so its stacked adapter feed is reused
        return sorted(self.index.cover(likely, max_sets=cfg.max_adapters, weights=weights))

    def merge(self, exit_probs: np.ndarray, adapter_probs: np.ndarray, chosen: Sequence[int]) -> np.ndarray:
        """(K,) scores: each class covered by the chosen contexts gets the mean of their adapters' scores,
        every other class keeps the exit's score (no class is ever blind).

        adapter_probs (M, K): row i is the adapter of context chosen[i], scored over all K classes (entries
        outside its context are ignored).
        """
        p = self._probs(exit_probs)
        a = np.asarray(adapter_probs)
        if a.ndim != 2 or a.shape != (len(chosen), self.num_classes):
            raise ValueError(
                f"adapter_probs has shape {a.shape}; expected ({len(chosen)}, {self.num_classes}): "
                "one row per chosen context"
            )
        out = p.astype(np.float32, copy=True)
        if len(chosen) == 0:
            return out
        weights, covered = self._merge_plan(tuple(chosen))
        np.copyto(out, (weights * a).sum(axis=0), where=covered)
        return out

    def _merge_plan(self, chosen: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(M, K) averaging weights (membership / number of chosen contexts holding the class) and the (K,)
        covered mask of a chosen set; cached, since streams repeat their sets frame after frame."""
        plan = self._plans.get(chosen)
        if plan is None:
            mem = self._member_f[np.asarray(chosen, dtype=np.intp)]
            count = mem.sum(axis=0)
            plan = (mem / np.maximum(count, 1.0), count > 0)
            if len(self._plans) >= 1024:  # sets of at most max_adapters contexts: in practice a few dozen
                self._plans.clear()
            self._plans[chosen] = plan
        return plan

    def observe(self, state: PolicyState, labels: np.ndarray) -> None:
        """Record the labels published for this frame ((K,) bool), kept keep_frames frames for continuity."""
        lab = np.asarray(labels)
        if lab.shape != (self.num_classes,):
            raise ValueError(f"labels has shape {lab.shape}; expected ({self.num_classes},)")
        current = frozenset(np.flatnonzero(lab).tolist())
        state.prev_labels = current
        state.history.append(current)
        while len(state.history) > self.cfg.keep_frames:  # also follows keep_frames changed at run time
            state.history.popleft()
        state.recent = frozenset().union(*state.history)
