"""Optional Prometheus endpoint, on its own registry (no process-global collectors)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from polymorphd.models.core.errors import ConfigError

log = logging.getLogger(__name__)

_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500)
_ENERGY_BUCKETS_MJ = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)


class Metrics:
    """Counters and histograms for one camera; serve() exposes them over HTTP."""

    def __init__(self, camera: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, cam = self.registry, ("camera",)
        self._frames = Counter("polymorphd_frames", "Frames published", cam, registry=r)
        self._errors = Counter("polymorphd_frame_errors", "Frames that failed inference", cam, registry=r)
        self._drops = Counter("polymorphd_dropped_frames", "Frames dropped before inference", cam, registry=r)
        self._pub_drops = Counter(
            "polymorphd_publish_dropped", "Messages the PUB socket dropped", cam, registry=r
        )
        self._exits = Counter(
            "polymorphd_exit_frames", "Frames answered per exit", ("camera", "exit"), registry=r
        )
        self._fps = Gauge("polymorphd_fps", "Published frames per second", cam, registry=r)
        self._adapters = Histogram(
            "polymorphd_adapters_per_frame",
            "Context adapters run per frame",
            cam,
            buckets=(0, 1, 2, 3, 4, 6, 8),
            registry=r,
        )
        self._latency = Histogram(
            "polymorphd_latency_ms",
            "Per-frame latency by stage (ms)",
            ("camera", "stage"),
            buckets=_LATENCY_BUCKETS_MS,
            registry=r,
        )
        self._energy = Histogram(
            "polymorphd_frame_energy_mj",
            "Inference energy per frame (mJ)",
            cam,
            buckets=_ENERGY_BUCKETS_MJ,
            registry=r,
        )
        self._energy_total = Counter("polymorphd_energy_mj", "Inference energy (mJ)", cam, registry=r)
        self.camera = camera
        self._server = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics_port {port}: cannot listen on {addr}:{port}: {exc.strerror or exc}"
            ) from exc
        log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)

    def frame(
        self,
        exit: int | str,
        adapters: Sequence[int],
        latency_ms: dict[str, float],
        energy_mj: float | None,
        dropped: int,
    ) -> None:
        c = self.camera
        self._frames.labels(c).inc()
        self._exits.labels(c, str(exit)).inc()
        self._adapters.labels(c).observe(len(adapters))
        for stage, ms in latency_ms.items():
            self._latency.labels(c, stage).observe(ms)
        if energy_mj is not None:
            self._energy.labels(c).observe(energy_mj)
            self._energy_total.labels(c).inc(energy_mj)
        if dropped:
            self._drops.labels(c).inc(dropped)

    def error(self) -> None:
        self._errors.labels(self.camera).inc()

    def publish_dropped(self, n: int) -> None:
        if n:
            self._pub_drops.labels(self.camera).inc(n)

    def fps(self, value: float) -> None:
        self._fps.labels(self.camera).set(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
