"""The daemon: lifecycle, frame loop and hot swap (uvicorn's shape, frigate's capture path).

start() is a straight list of steps: engine load + warm-up, energy meter,
metrics, sockets, capture thread, control thread, then READY=1. run() is the
frame loop; control requests that touch the engine (swap, rollback, knobs) are
queued and run by the loop between two frames, so no frame ever sees half a
swap. Loads happen off the loop (control thread or a reload worker). stop()
undoes start() in reverse with a bounded grace period.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from polymorphd.daemon.audio import AudioFeed
from polymorphd.daemon.config import DaemonConfig, load_config, overrides_from_args, summary
from polymorphd.daemon.control import ControlServer
from polymorphd.daemon.metrics import Metrics
from polymorphd.daemon.power import Meter, probe_meter
from polymorphd.daemon.publish import Publisher, label_payload
from polymorphd.daemon.seam import Engine, EngineFactory, EngineSlot
from polymorphd.daemon.sources import Frame, FrameSource, Opener
from polymorphd.daemon.stats import FrameSnapshot, FrameStats
from polymorphd.daemon.store import crash_point, resolve_load_path
from polymorphd.daemon.systemd import Notifier
from polymorphd.models.core.errors import PolymorphError

log = logging.getLogger(__name__)

_ENGINE_FIELDS = ("bundle", "mode", "providers", "threads", "pubkey")
_LIVE_FIELDS = (*_ENGINE_FIELDS, "policy", "include_scores", "heartbeat_s", "log_level", "warmup_runs")


def _default_factory(path: str, **kwargs: Any) -> Engine:
    from polymorphd.daemon.engine import load_engine  # ONNX Runtime only once an engine is loaded

    return load_engine(path, **kwargs)


def _default_adapter_check(path: str) -> bool:
    from polymorphd.daemon.engine import is_adapter_bundle

    return is_adapter_bundle(path)


class Daemon:
    """One camera, one engine reference, one label stream."""

    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        config_path: str | None = None,
        overrides: dict[str, Any] | None = None,
        engine_factory: EngineFactory | None = None,
        adapter_check: Callable[[str], bool] | None = None,
        opener: Opener | None = None,
        meter: Meter | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._config_path, self._overrides = config_path, overrides or {}
        self.slot = EngineSlot(engine_factory or _default_factory, adapter_check or _default_adapter_check)
        self._opener, self.meter = opener, meter
        self.notifier = Notifier(env)
        self._env = os.environ if env is None else env  # read for POLYMORPHD_FAULT (crash tests) only
        self.state = "created"
        self._stop, self._loop_done = threading.Event(), threading.Event()
        self._loop_done.set()  # no loop is running yet
        self._signalled = self._reload_requested = False  # set by signal handlers: plain flags, no locks
        self._load_lock = threading.Lock()
        self._actions: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.ctx: zmq.Context | None = None
        self.publisher: Publisher | None = None
        self.source: FrameSource | None = None
        self.control: ControlServer | None = None
        self.metrics = Metrics(cfg.camera)  # collectors only; served by start() when a port is configured
        self.frame_stats = FrameStats(self.metrics)
        self._auth: Any = None
        self._started = time.monotonic()
        self._failed_unreported = 0  # failed frames not yet reported as dropped in a label message
        self._last_status = self._last_sd_status = float("-inf")
        self.audio = AudioFeed(cfg.audio, cfg.audio_fps)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        log.info("starting: %s", summary(cfg))
        try:
            self.slot.swap(self.slot.prepare(cfg.bundle, cfg))
            self.meter = self.meter or probe_meter()
            if cfg.metrics_port:
                self.metrics.serve(cfg.metrics_port, cfg.metrics_addr)
            self.ctx = zmq.Context()
            if cfg.curve is not None:
                self._start_auth(cfg)
            self.publisher = Publisher(self.ctx, cfg.pub, cfg.camera, cfg.payload_format, cfg.curve)
            self.audio.start(self.engine)
            self.source = FrameSource.from_config(cfg, self._opener)
            self.source.start()
            handlers = {
                "status": self._cmd_status,
                "stats": self._cmd_stats,
                "load": self._cmd_load,
                "rollback": self._cmd_rollback,
                "reload": self._cmd_reload,
                "set": self._cmd_set,
            }
            self.control = ControlServer(self.ctx, cfg.ctl, handlers, cfg.curve)
            self.control.start()
        except BaseException:
            self.stop()
            raise
        self.state = "running"
        self._publish_status()
        self.notifier.ready(self._sd_status())
        log.info(
            "serving %s on %s (control %s)",
            self.engine.bundle_id,
            self.publisher.address,
            self.control.address,
        )

    def run(self) -> None:
        """The frame loop; returns when stop is requested. One bad frame never ends it."""
        self._loop_done.clear()
        try:
            while not (self._stop.is_set() or self._signalled):
                self._tick()
                frame = self.source.get(timeout=0.05)
                if frame is not None:
                    self._process(frame)
        finally:
            self._loop_done.set()

    def request_stop(self) -> None:
        """From another thread: end the loop after the current frame."""
        self._stop.set()

    def signal_stop(self) -> None:
        """From a signal handler: only sets a flag (taking a lock here could deadlock the main thread)."""
        self._signalled = True

    def request_reload(self) -> None:
        """From a signal handler: the loop starts the reload off-loop."""
        self._reload_requested = True

    def stop(self) -> None:
        """Undo start() in reverse, all within cfg.stop_timeout_s (threads still busy then are left to exit)."""
        if self.state in ("stopped", "stopping"):
            return
        deadline = time.monotonic() + self.cfg.stop_timeout_s

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        self.state = "stopping"
        self.notifier.stopping()
        self._stop.set()
        if not self._loop_done.wait(left()):
            # The loop thread still owns the PUB socket: leave sockets to process exit rather than race it.
            log.warning(
                "frame loop still busy after %.1f s; exiting without the final status",
                self.cfg.stop_timeout_s,
            )
        loop_done = self._loop_done.is_set()
        while not self._actions.empty():
            _, fut = self._actions.get_nowait()
            fut.set_exception(PolymorphError("daemon is stopping"))
        clean = loop_done
        if self.control is not None:
            clean = self.control.stop(left()) and clean
        if self.source is not None:
            self.source.stop(left())
        self.audio.stop()
        if self.publisher is not None and loop_done:
            self.state = "stopped"
            self._publish_status()
            self.publisher.close(linger_ms=200)  # a bounded chance for the final status to leave
        if self._auth is not None:
            self._auth.stop()
        if self.ctx is not None and clean:
            self.ctx.term()  # would block on the control socket if its thread were still busy
        for closer in (self.metrics, self.meter, self.slot):
            if closer is not None:
                closer.close()
        self.notifier.close()
        self.state = "stopped"
        log.info("stopped after %d frames", self.frames)

    @property
    def engine(self) -> Engine | None:
        return self.slot.engine

    @property
    def previous(self) -> Engine | None:
        return self.slot.previous

    @property
    def frames(self) -> int:
        return self.frame_stats.frames

    @property
    def frame_errors(self) -> int:
        return self.frame_stats.errors

    def _start_auth(self, cfg: DaemonConfig) -> None:
        from polymorphd.daemon.auth import ClientAuth

        self._auth = ClientAuth(self.ctx, cfg.curve)

    # ---- frame loop ------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        while True:
            try:
                fn, fut = self._actions.get_nowait()
            except queue.Empty:
                break
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)
        if self._reload_requested:
            self._reload_requested = False
            threading.Thread(target=self._reload_logged, name="polymorphd-reload", daemon=True).start()
        self.notifier.watchdog()
        now = time.monotonic()
        if now - self._last_status >= self.cfg.heartbeat_s:
            self._publish_status()
        if now - self._last_sd_status >= 5.0:
            self._last_sd_status = now
            self.notifier.status(self._sd_status())

    def _process(self, frame: Frame) -> None:
        t_start = time.time_ns()
        engine, state = self.slot.engine, self.slot.state
        try:
            self._meter_call(self.meter.sample)
            mel = self.audio.window(frame.index, frame.ts_ns, engine)
            r = engine.infer(frame.image, state, mel)
            energy = self._meter_call(self.meter.energy_mj, r.infer_t0_ns, r.infer_t1_ns)
            dropped = self.source.take_dropped() + self._failed_unreported
            latency = {
                "capture": frame.read_ms + (t_start - frame.ts_ns) / 1e6,
                "preprocess": r.preprocess_ms,
                "inference": r.inference_ms,
            }
            body = label_payload(
                camera=self.cfg.camera,
                frame_ts=frame.ts_ns,
                bundle=engine.bundle_id,
                classes=engine.classes,
                probs=r.probs,
                labels=r.labels,
                exit=r.exit,
                adapters=r.adapters,
                latency_ms=latency,
                energy_mj=energy,
                energy_source=self.meter.source,
                dropped=dropped,
                include_scores=self.cfg.include_scores,
                truth=frame.truth,
                count=r.count,
            )
            latency["total"] = frame.read_ms + (time.time_ns() - frame.ts_ns) / 1e6
            body["latency_ms"]["total"] = round(latency["total"], 3)
        except Exception as exc:  # log, count, continue: one bad frame must not end the stream
            self._failed_unreported += 1
            n = self.frame_stats.error()
            level = logging.WARNING if n <= 5 or n % 100 == 0 else logging.DEBUG
            log.log(level, "frame %d failed (%d so far): %s: %s", frame.index, n, type(exc).__name__, exc)
            return
        self._failed_unreported = 0
        pub_dropped = self.publisher.dropped
        self.publisher.publish_labels(body)
        pub_dropped = self.publisher.dropped - pub_dropped
        self.frame_stats.frame(r.exit, r.adapters, latency, energy, dropped, pub_dropped)

    def _meter_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A failing meter (a sysfs file gone, jtop died) costs the energy figure, never the labels."""
        try:
            return fn(*args)
        except Exception as exc:
            log.warning("energy meter %s failed (%s); energy_mj is null from now on", self.meter.source, exc)
            self.meter = Meter()
            return None

    def _between_frames(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run fn on the frame loop at a frame boundary and return its result."""
        if self._stop.is_set():
            raise PolymorphError("daemon is stopping")
        fut: Future = Future()
        self._actions.put((fn, fut))
        try:
            return fut.result(timeout)
        except TimeoutError as exc:
            raise PolymorphError(f"frame loop did not reach a frame boundary within {timeout:g} s") from exc

    # ---- engines ---------------------------------------------------------------------------------------------
    def _load(self, path: str, cfg: DaemonConfig) -> dict[str, Any]:
        with self._load_lock:
            new = self.slot.prepare(path, cfg)  # off the frame loop: the serving engine is untouched
            crash_point(self._env, "load:prepared")
            try:
                reply = self._between_frames(lambda: self.slot.swap(new))
            except BaseException:
                new.close()
                raise
            crash_point(self._env, "load:swapped")
            return reply

    def reload(self) -> dict[str, Any]:
        """Re-read the config; reload the bundle when its fields changed or its path now resolves elsewhere
        (a `current` symlink swapped), and always when there is no config file."""
        self.notifier.reloading()
        try:
            new = load_config(self._config_path, self._overrides) if self._config_path else self.cfg
            old = self.cfg
            changed = [f for f in DaemonConfig.model_fields if getattr(new, f) != getattr(old, f)]
            reply: dict[str, Any] = {"restart_required": [f for f in changed if f not in _LIVE_FIELDS]}
            merged = old.model_copy(update={f: getattr(new, f) for f in _LIVE_FIELDS})
            moved = self.slot.moved(merged.bundle)  # a `current` symlink swapped
            if not self._config_path or moved or any(f in changed for f in _ENGINE_FIELDS):
                reply.update(self._load(merged.bundle, merged))
                reply["reloaded_bundle"] = True
            elif "policy" in changed and merged.policy:
                reply["knobs"] = self._between_frames(lambda: self.engine.set_knobs(**merged.policy))
            self.cfg = merged
            if "log_level" in changed:
                logging.getLogger("polymorphd").setLevel(merged.log_level)
            reply["applied"] = [f for f in changed if f in _LIVE_FIELDS]
            if self._auth is not None:  # client keys added to or removed from clients_dir: key rotation
                reply["curve_clients"] = self._auth.reload()
            return reply
        finally:
            self.notifier.ready(self._sd_status())

    def _reload_logged(self) -> None:
        try:
            log.info("reload (SIGHUP): %s", self.reload())
        except Exception as exc:
            log.error("reload failed, still serving %s: %s", self.engine.bundle_id, exc)

    # ---- control handlers (control thread) -------------------------------------------------------------------
    def _cmd_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def _cmd_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.stats()

    def _cmd_load(self, req: dict[str, Any]) -> dict[str, Any]:
        # checked before anything reads the path (even the adapter-bundle check reads its manifest)
        return self._load(resolve_load_path(req["path"], self.cfg.bundle_store), self.cfg)

    def _cmd_rollback(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._between_frames(self.slot.rollback)

    def _cmd_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.reload()

    def _cmd_set(self, req: dict[str, Any]) -> dict[str, Any]:
        knobs = {k: v for k, v in req.items() if k != "cmd"}
        return {"knobs": self._between_frames(lambda: self.slot.set_knobs(**knobs))}

    # ---- reporting -------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._status(self.frame_stats.snapshot())

    def _status(self, snap: FrameSnapshot) -> dict[str, Any]:
        src = self.source.stats() if self.source is not None else {"state": "starting"}
        return {
            "state": self.state,
            "bundle": self.engine.bundle_id if self.engine is not None else None,
            "previous": self.previous.bundle_id if self.previous is not None else None,
            "mode": self.cfg.mode,
            "fps": round(snap.fps, 2),
            "frames": snap.frames,
            "seq": self.publisher.seq if self.publisher is not None else 0,
            "frame_errors": snap.errors,
            "dropped": snap.dropped,
            "source": src,
            "energy_source": self.meter.source if self.meter is not None else "none",
            **({"audio": audio} if (audio := self.audio.status()) is not None else {}),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "pid": os.getpid(),
        }

    def stats(self) -> dict[str, Any]:
        snap = self.frame_stats.snapshot()  # one snapshot: the status part and the summaries agree
        return {
            **self._status(snap),
            "exits": snap.exits,
            "latency_ms": snap.latency_ms(),
            "energy_mj_mean": snap.energy_mj_mean(),
            "published": self.publisher.sent if self.publisher else 0,
            "publish_dropped": self.publisher.dropped if self.publisher else 0,
            "knobs": self.engine.knobs() if self.engine is not None else {},
            "control_requests": self.control.requests if self.control else 0,
        }

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        if self.publisher is not None:
            self.publisher.publish_status(self.status())

    def _sd_status(self) -> str:
        bundle = self.engine.bundle_id if self.engine is not None else "-"
        snap = self.frame_stats.snapshot()
        return f"{bundle}, {snap.fps:.1f} fps, {snap.frames} frames"


def cli_serve(args: argparse.Namespace) -> int:
    """``polymorphd serve``: validate the config, then run until SIGTERM/SIGINT (SIGHUP reloads)."""
    overrides = overrides_from_args(args)
    cfg = load_config(args.config, overrides)
    if args.validate_config:
        print(f"config OK: {summary(cfg)}")
        return 0
    if not getattr(args, "verbose", 0):
        logging.getLogger("polymorphd").setLevel(cfg.log_level)
    daemon = Daemon(cfg, config_path=args.config, overrides=overrides)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: daemon.signal_stop()),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: daemon.signal_stop()),
        signal.SIGHUP: signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload()),
    }
    try:
        daemon.start()
        daemon.run()
    finally:
        daemon.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
