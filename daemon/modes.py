"""One preprocessed frame through one execution mode (DESIGN.md "Data flow", modes). Torch-free.

- ``full``: every segment, no exits, generalist tail.
- ``early-exit``: segments with exits; stop at the first exit that decides (DESIGN.md "Early-exit policy"),
  else the generalist tail.
- ``polymorph``: as early-exit; when no exit decides, the context policy picks adapters from the last exit's
  probabilities, ONE ``tail_lora`` run scores all of them over the shared trunk tokens, and the policy merges.
- ``switching``: as polymorph, but each chosen context runs a WHOLE specialist forward (every segment again +
  its adapter tail): the model-switching baseline, no shared trunk.
- ``merged``: as polymorph, but each chosen context's LoRA deltas are merged into the tail weights
  (W + B·A, numpy, when the set changes; the cost lands in that frame) and ``tail_weights`` runs once per
  context: the weight-merging baseline.

The exit stage is common to the three context modes (it is the selector), so they decide the same frames at
the exits and pick the same contexts; they differ only in how the adapters run, which is what the benchmark
compares. Labels are ``probs > class_thresholds``, or ``probs > hi`` when an exit answered.

Scores share one scale: an exit whose logits are centred on its own per-class thresholds (manifest
``centred``, calibration's ``logit_offsets``) is mapped onto the final classifier's, ``sigmoid(logit(p) +
logit(class_threshold))``, wherever its scores are published (a deciding exit, classes no chosen adapter
covers). Mixing the two scales within a class cost polymorph 3.9 mAP on the base run's tail path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from polymorphd.daemon.adapters import AdapterBank
from polymorphd.daemon.graphs import Clock, Trunk
from polymorphd.models.core.countrule import count_decides
from polymorphd.models.core.exitrule import THRESHOLD_EPS, exit_decides
from polymorphd.models.core.modes import Mode

CONTEXT_MODES: tuple[Mode, ...] = ("polymorph", "switching", "merged")


@dataclass(slots=True)
class Outcome:
    probs: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) bool
    exit: int | Literal["final"]
    chosen: list[int]  # context indices whose adapters ran
    gflops: float
    count: float | None = None  # objects in the frame: the answering (else last) audiovisual exit's count


@dataclass(slots=True)
class AudioExits:
    """The calibrated rule of the bundle's audiovisual exits (manifest ``audio``), one entry per exit."""

    lo: np.ndarray
    hi: np.ndarray
    margin: np.ndarray  # count rule: |count - round(count)| <= margin


def _blas_one_thread() -> contextlib.AbstractContextManager:
    """numpy's BLAS single-threaded for the merge: OpenBLAS workers spin-wait after a call and stole the CPU
    from the next ORT run (base shapes: tail_weights 3 ms -> 3-15 ms). threadpoolctl is optional (not a
    runtime dependency); without it the merge runs as numpy is configured."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class MergedTails:
    """The weight-merging baseline's state: merged tail weights for the contexts of the active set."""

    def __init__(self, base: dict[str, np.ndarray], bank: AdapterBank, inputs: Sequence[str]) -> None:
        self.base = base
        self.bank = bank
        self.inputs = [n for n in inputs if n != "tokens"]
        self.feeds: dict[int, dict[str, np.ndarray]] = {}
        # (weight input, lora name) pairs that get a delta: w.<name> with lora_A.<name> in the adapters
        lora = {n[len("lora_A.") :] for n in bank.names if n.startswith("lora_A.")}
        self.deltas = [(f"w.{n}", n) for n in sorted(lora) if f"w.{n}" in self.inputs]
        self.merge_gflops = 0.0
        for w_name, n in self.deltas:
            out, inp = base[w_name].shape
            r = bank.tensor(0, f"lora_A.{n}").shape[1] if len(bank) else 0
            self.merge_gflops += (2 * out * r * inp + out * inp) / 1e9  # B @ A, then W + delta

    def activate(self, chosen: Sequence[int]) -> float:
        """Merge weights for contexts new to the set, drop the others; returns the GFLOPs spent merging."""
        for c in [c for c in self.feeds if c not in chosen]:
            del self.feeds[c]
        new = [c for c in chosen if c not in self.feeds]
        if new:
            with _blas_one_thread():
                for c in new:
                    self.feeds[c] = self._merge(c)
        return len(new) * self.merge_gflops

    def _merge(self, c: int) -> dict[str, np.ndarray]:
        feed = {n: self.base[n] for n in self.inputs if n in self.base}
        for w_name, n in self.deltas:
            a = self.bank.tensor(c, f"lora_A.{n}")[0]  # (r, in)
            b = self.bank.tensor(c, f"lora_B.{n}")[0]  # (out, r), LoRA scale folded in
            feed[w_name] = self.base[w_name] + b @ a
        feed["head_w"] = self.bank.tensor(c, "head_w")[0]
        feed["head_b"] = self.bank.tensor(c, "head_b")[0]
        return feed

    def reset(self) -> None:
        self.feeds.clear()


class Pipeline:
    """Runs frames through the trunk, exits and tails; holds the thresholds and per-graph feed dicts."""

    def __init__(
        self,
        trunk: Trunk,
        bank: AdapterBank,
        policy: Any,
        class_thresholds: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        gflops: dict[str, Any],
        merged: MergedTails | None,
        centred: Sequence[bool] = (),
        audio: AudioExits | None = None,
    ) -> None:
        self.trunk, self.bank, self.policy, self.merged = trunk, bank, policy, merged
        self.audio = audio
        self.class_thr = class_thresholds
        self.lo, self.hi = lo, hi
        self.centred = [bool(c) for c in centred] or [False] * len(trunk.exits)
        nan = float("nan")
        self.gf_seg = [float(g) for g in gflops.get("segments", [nan] * len(trunk.segments))]
        self.gf_exit = [float(g) for g in gflops.get("exits", [nan] * len(trunk.exits))]
        self.gf_tail = float(gflops.get("tail", nan))
        self.gf_lora = float(gflops.get("tail_lora_per_adapter", nan))
        self.gf_trunk = math.fsum(self.gf_seg)
        # pre-built feed dicts: a frame only swaps the array in
        self._seg_feeds = [{g.inputs[0]: None} for g in trunk.segments]
        self._exit_feeds = [{"tokens": None} for _ in trunk.exits]
        self._tail_feed: dict[str, Any] = {"tokens": None}
        self._no_exit = np.zeros(len(class_thresholds), dtype=np.float32)
        self._last_exit: np.ndarray | None = None
        self._last_j = 0
        self._count: float | None = None
        self._av_walk = False
        t = np.clip(np.asarray(class_thresholds, dtype=np.float64), THRESHOLD_EPS, 1.0 - THRESHOLD_EPS)
        self._odds = (t / (1.0 - t)).astype(np.float32)  # for _final_scale

    def run(
        self, mode: str, x: np.ndarray, pstate: Any, clock: Clock, mel: np.ndarray | None = None
    ) -> Outcome:
        """One frame; ``mel`` (1, n_mels, frames): its log-mel window, which switches the exits to the
        audiovisual ones (the bundle must have them) and adds the count."""
        exits = mode != "full"
        self._count = None
        self._av_walk = mel is not None and exits and self.audio is not None
        tokens, j, p, gf = self._walk(x, clock, exits, mel if self._av_walk else None)
        hi = self.audio.hi if self._av_walk and self.audio is not None else self.hi
        out = self._answer(mode, x, tokens, j, p, gf, hi, pstate, clock)
        out.count = self._count
        return out

    def _answer(
        self, mode: str, x: np.ndarray, tokens: np.ndarray, j: int | None, p: Any, gf: float, hi: np.ndarray,
        pstate: Any, clock: Clock,
    ) -> Outcome:  # fmt: skip
        if j is not None:  # an exit decided
            return Outcome(self._final_scale(p, j), p > hi[j], j, [], gf)
        if mode in CONTEXT_MODES:
            # the policy reads the exit's own scale (recall_threshold relative to each class's threshold)
            scores = self._last_exit if self._last_exit is not None else self._no_exit
            chosen = self.policy.select(pstate, scores)
            if chosen:
                if mode == "polymorph":
                    rows, extra = self._polymorph(tokens, chosen, clock)
                elif mode == "switching":
                    rows, extra = self._switching(x, chosen, clock)
                else:
                    rows, extra = self._merged(tokens, chosen, clock)
                kept = self._final_scale(scores, self._last_j) if self._last_exit is not None else scores
                probs = np.asarray(self.policy.merge(kept, rows, chosen), dtype=np.float32)
                return Outcome(probs, probs > self.class_thr, "final", list(chosen), gf + extra)
        probs = self._tail(tokens, clock)
        return Outcome(probs, probs > self.class_thr, "final", [], gf + self.gf_tail)

    def _walk(
        self, x: np.ndarray, clock: Clock, exits: bool, mel: np.ndarray | None = None
    ) -> tuple[np.ndarray, int | None, Any, float]:
        """Segments (and exits): returns (tokens, deciding exit or None, its probs, GFLOPs). With ``mel``, the
        audiovisual exits: one answers when its labels (lo, hi) and its count (margin) are both decided; the
        count of the deciding, else the last, exit is kept in ``_count``."""
        t, gf = x, 0.0
        self._last_exit = None
        after = self.trunk.exit_after
        for i, seg in enumerate(self.trunk.segments):
            feed = self._seg_feeds[i]
            feed[seg.inputs[0]] = t
            t = seg.run(feed, clock)
            gf += self.gf_seg[i]
            j = after[i]
            if not exits or j is None:
                continue
            # audiovisual exits count as the visual exit's cost: the audio tokens add about half (docs)
            gf += self.gf_exit[j]
            if mel is None:
                ef = self._exit_feeds[j]
                ef["tokens"] = t
                p = self.trunk.exits[j].run(ef, clock)[0]
                decided = exit_decides(p, self.lo[j], self.hi[j])
            else:
                assert self.audio is not None
                probs, count = self.trunk.av_exits[j].run_all({"tokens": t, "mel": mel}, clock)
                p, c, a = probs[0], float(count[0]), self.audio
                self._count = max(c, 0.0)
                decided = exit_decides(p, a.lo[j], a.hi[j]) and count_decides(c, float(a.margin[j]))
            self._last_exit, self._last_j = p, j
            if decided:
                return t, j, p, gf
        return t, None, None, gf

    def _final_scale(self, p: np.ndarray, j: int) -> np.ndarray:
        """Exit j's probabilities on the final classifier's scale (unchanged for an uncentred exit).

        sigmoid(logit(p) + logit(t)) written with odds, p·a / (p·a + 1 - p) with a = t / (1 - t): three
        float32 operations, exact at p = 0 and 1 (the log form cost 0.08 ms per frame).
        """
        if not (
            self.centred[j] or self._av_walk
        ):  # audiovisual exits are always centred (export folds offsets)
            return p
        num = p * self._odds
        return num / (num + (1.0 - p))

    def _tail(self, tokens: np.ndarray, clock: Clock) -> np.ndarray:
        self._tail_feed["tokens"] = tokens
        return self.trunk.tail.run(self._tail_feed, clock)[0]

    def _polymorph(self, tokens: np.ndarray, chosen: list[int], clock: Clock) -> tuple[np.ndarray, float]:
        feed = self.bank.stacked(tuple(chosen))
        feed["tokens"] = tokens
        return self.trunk.tail_lora.run(feed, clock), len(chosen) * self.gf_lora

    def _switching(self, x: np.ndarray, chosen: list[int], clock: Clock) -> tuple[np.ndarray, float]:
        rows = np.empty((len(chosen), len(self.class_thr)), dtype=np.float32)
        for m, c in enumerate(chosen):
            t = x
            for i, seg in enumerate(self.trunk.segments):
                feed = self._seg_feeds[i]
                feed[seg.inputs[0]] = t
                t = seg.run(feed, clock)
            feed = self.bank.stacked((c,))
            feed["tokens"] = t
            rows[m] = self.trunk.tail_lora.run(feed, clock)[0]
        return rows, len(chosen) * (self.gf_trunk + self.gf_lora)

    def _merged(self, tokens: np.ndarray, chosen: list[int], clock: Clock) -> tuple[np.ndarray, float]:
        assert self.merged is not None and self.trunk.tail_weights is not None  # checked when the mode is set
        gf = self.merged.activate(chosen)
        rows = np.empty((len(chosen), len(self.class_thr)), dtype=np.float32)
        for m, c in enumerate(chosen):
            feed = self.merged.feeds[c]
            feed["tokens"] = tokens
            rows[m] = self.trunk.tail_weights.run(feed, clock)[0]
        return rows, gf + len(chosen) * self.gf_tail
