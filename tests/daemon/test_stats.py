"""FrameStats: one update per frame, one snapshot for the control replies and heartbeats, same counts in /metrics."""

from __future__ import annotations

import itertools

from prometheus_client import generate_latest

from polymorphd.daemon.metrics import Metrics
from polymorphd.daemon.stats import FrameStats


def test_snapshot_counts_windows_and_summaries():
    ticks = itertools.count(0.0, 0.1)  # a frame every 100 ms
    stats = FrameStats(window=3, clock=lambda: next(ticks))
    assert stats.snapshot().fps == 0.0 and stats.snapshot().latency_ms() == {}
    for i, energy in enumerate([1.0, None, 3.0, 5.0]):
        stats.frame(i % 2 or "final", [0], {"inference": float(i)}, energy, dropped=i)
    assert stats.error() == 1
    snap = stats.snapshot()
    assert (snap.frames, snap.errors, snap.dropped) == (4, 1, 6)
    assert round(snap.fps, 6) == 10.0
    assert snap.exits == {"final": 2, "1": 2}
    assert snap.latency_ms() == {"inference": {"mean": 2.0, "p50": 2.0, "p95": 2.9}}  # last 3 frames
    assert snap.energy_mj_mean() == 3.0  # frames without a reading add none
    stats.frame(0, [], {"inference": 9.0}, None, 0)
    assert snap.frames == 4  # a snapshot does not move


def test_the_same_update_feeds_prometheus():
    metrics = Metrics("cam0")
    stats = FrameStats(metrics)
    stats.frame(0, [1, 2], {"inference": 4.0}, 2.5, dropped=2, publish_dropped=3)
    stats.error()
    text = generate_latest(metrics.registry).decode()
    for line in (
        'polymorphd_frames_total{camera="cam0"} 1.0',
        'polymorphd_frame_errors_total{camera="cam0"} 1.0',
        'polymorphd_dropped_frames_total{camera="cam0"} 2.0',
        'polymorphd_publish_dropped_total{camera="cam0"} 3.0',
        'polymorphd_exit_frames_total{camera="cam0",exit="0"} 1.0',
        'polymorphd_energy_mj_total{camera="cam0"} 2.5',
    ):
        assert line in text
