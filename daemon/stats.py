"""Per-frame statistics, kept once: the frame loop records, status/stats replies and heartbeats read snapshots.

``FrameStats.frame`` is the one update per published frame (``error`` per failed one); it also feeds the
Prometheus collectors, so the control replies, the status heartbeats, the sd_notify line and /metrics count
the same frames. ``snapshot`` copies under a lock (the control thread reads while the loop writes); the
latency and energy summaries are computed from the copy only when a ``stats`` reply asks for them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from polymorphd.daemon.metrics import Metrics

_FPS_EVERY = 16  # frames between updates of the Prometheus fps gauge


@dataclass(frozen=True)
class FrameSnapshot:
    """The statistics at one instant; the summaries are computed on demand from the copied windows."""

    frames: int  # published
    errors: int  # failed inference
    dropped: int  # dropped before inference (capture) or failed, as reported in label messages
    fps: float  # over the last published frames
    exits: dict[str, int]  # frames answered per exit ("0", "1", ..., "final")
    recent: tuple[dict[str, float], ...]  # latency per stage (ms) of the last frames
    energy: tuple[float, ...]  # energy (mJ) of the last frames that had a reading

    def latency_ms(self) -> dict[str, dict[str, float]]:
        """Mean, p50 and p95 per stage over the recent window."""
        out: dict[str, dict[str, float]] = {}
        if self.recent:
            for stage in self.recent[-1]:
                v = np.array([d[stage] for d in self.recent if stage in d])
                out[stage] = {
                    "mean": round(float(v.mean()), 3),
                    "p50": round(float(np.percentile(v, 50)), 3),
                    "p95": round(float(np.percentile(v, 95)), 3),
                }
        return out

    def energy_mj_mean(self) -> float | None:
        return round(float(np.mean(self.energy)), 4) if self.energy else None


class FrameStats:
    """Counters and recent windows for one stream, optionally mirrored into Prometheus ``Metrics``."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        window: int = 512,
        fps_window: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics, self._clock = metrics, clock
        self._lock = threading.Lock()
        self.frames = self.errors = self.dropped = 0
        self._times: deque[float] = deque(maxlen=fps_window)
        self._recent: deque[dict[str, float]] = deque(maxlen=window)
        self._energy: deque[float] = deque(maxlen=window)
        self._exits: Counter[str] = Counter()

    def frame(
        self,
        exit: int | str,
        adapters: Sequence[int],
        latency_ms: dict[str, float],
        energy_mj: float | None,
        dropped: int,
        publish_dropped: int = 0,
    ) -> None:
        """One published frame; ``publish_dropped``: messages the PUB socket dropped while sending it."""
        with self._lock:
            self.frames += 1
            self.dropped += dropped
            self._times.append(self._clock())
            self._recent.append(latency_ms)
            self._exits[str(exit)] += 1
            if energy_mj is not None:
                self._energy.append(energy_mj)
            fps = self._fps() if self.frames % _FPS_EVERY == 0 else None
        if self.metrics is not None:
            self.metrics.publish_dropped(publish_dropped)
            self.metrics.frame(exit, adapters, latency_ms, energy_mj, dropped)
            if fps is not None:
                self.metrics.fps(fps)

    def error(self) -> int:
        """One frame whose inference failed; returns the number so far."""
        with self._lock:
            self.errors += 1
            n = self.errors
        if self.metrics is not None:
            self.metrics.error()
        return n

    def snapshot(self) -> FrameSnapshot:
        with self._lock:
            return FrameSnapshot(
                frames=self.frames,
                errors=self.errors,
                dropped=self.dropped,
                fps=self._fps(),
                exits=dict(self._exits),
                recent=tuple(self._recent),
                energy=tuple(self._energy),
            )

    def _fps(self) -> float:
        t = self._times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
