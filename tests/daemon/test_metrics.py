"""Prometheus metrics: own registry, per-exit counts, latency histograms, energy, HTTP endpoint."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from polymorphd.daemon.metrics import Metrics
from polymorphd.models.core.errors import ConfigError


def test_counts_and_histograms():
    m = Metrics("cam0")
    m.frame(0, [], {"inference": 4.0, "total": 9.0}, 12.5, dropped=2)
    m.frame("final", [1, 3], {"inference": 30.0, "total": 40.0}, None, dropped=0)
    m.frame(0, [2], {"inference": 5.0, "total": 10.0}, 7.5, dropped=0)
    m.error()
    m.publish_dropped(3)
    m.fps(29.5)
    get = m.registry.get_sample_value
    assert get("polymorphd_frames_total", {"camera": "cam0"}) == 3
    assert get("polymorphd_exit_frames_total", {"camera": "cam0", "exit": "0"}) == 2
    assert get("polymorphd_exit_frames_total", {"camera": "cam0", "exit": "final"}) == 1
    assert get("polymorphd_dropped_frames_total", {"camera": "cam0"}) == 2
    assert get("polymorphd_publish_dropped_total", {"camera": "cam0"}) == 3
    assert get("polymorphd_frame_errors_total", {"camera": "cam0"}) == 1
    assert get("polymorphd_fps", {"camera": "cam0"}) == 29.5
    assert get("polymorphd_adapters_per_frame_sum", {"camera": "cam0"}) == 3
    assert get("polymorphd_latency_ms_count", {"camera": "cam0", "stage": "total"}) == 3
    assert get("polymorphd_latency_ms_bucket", {"camera": "cam0", "stage": "inference", "le": "5.0"}) == 2
    assert get("polymorphd_energy_mj_total", {"camera": "cam0"}) == 20.0
    assert get("polymorphd_frame_energy_mj_count", {"camera": "cam0"}) == 2
    assert Metrics("cam1").registry.get_sample_value("polymorphd_frames_total", {"camera": "cam0"}) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_endpoint():
    m = Metrics("cam0")
    m.frame(1, [], {"total": 1.0}, None, 0)
    port = free_port()
    m.serve(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'polymorphd_frames_total{camera="cam0"} 1.0' in text
        with pytest.raises(ConfigError, match=f"metrics_port {port}: cannot listen"):
            Metrics("x").serve(port)
    finally:
        m.close()
