"""Frame sources: a capture thread that keeps the latest frame, rate-limits, and reconnects.

URIs: ``/dev/videoN`` or ``N`` (V4L2), a video file, ``rtsp://``/``http(s)://``
streams, ``gst:PIPELINE`` (GStreamer, e.g. Jetson CSI cameras) and
``synthetic:[?seed=3&classes=32]`` (the synthetic generator, with ground truth).
The capture thread never waits for inference under the default drop-oldest
policy: an unread frame is replaced and counted as dropped (frigate's capture path).
On-demand sources (synthetic:, video files) at an unlimited rate are the exception:
with no clock to keep up with, the next frame is read when the loop takes this one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from polymorphd.daemon.config import DaemonConfig, parse_synthetic, source_kind
from polymorphd.models.core.errors import ConfigError

log = logging.getLogger(__name__)

# "stalled": live, but no frame for stall_s (a stream that hangs without closing); reported, not a thread state
SourceState = Literal["starting", "live", "stalled", "reconnecting", "ended", "stopped"]


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 BGR
    ts_ns: int  # capture time: time.time_ns() when the read returned
    index: int  # frames read from this source since start
    read_ms: float  # how long the read itself took
    truth: tuple[int, ...] | None = None  # ground-truth class ids when the source knows them


class Capture(Protocol):
    """What the capture thread needs from a camera; ``finite`` sources end instead of reconnecting.

    An optional ``on_demand = True`` says frames are made when read (a generator, a file), not by a clock.
    """

    finite: bool

    def read(self) -> tuple[bool, np.ndarray | None, tuple[int, ...] | None]: ...

    def release(self) -> None: ...


Opener = Callable[[str, bool], Capture]  # (uri, loop) -> open capture; raises OSError when it cannot open


class CvCapture:
    """cv2.VideoCapture for V4L2, files, network streams and GStreamer pipelines."""

    def __init__(self, uri: str, loop: bool = False, read_timeout_s: float | None = None) -> None:
        import cv2

        kind = source_kind(uri)
        self.finite = kind == "file" and not loop
        self.on_demand = kind == "file"
        self._loop = kind == "file" and loop
        if kind == "v4l2":
            target: int | str = int(uri) if uri.isdigit() else uri
            self._cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
            # A one-frame driver buffer keeps what we read fresh when inference is slower than the camera.
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        elif kind == "gst":
            self._cap = cv2.VideoCapture(uri[4:].strip(), cv2.CAP_GSTREAMER)
        elif kind == "stream":
            # a stream that hangs without closing fails the read after the timeout, so it is reopened
            ms = int((read_timeout_s or 30.0) * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            self._cap = cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
        else:
            self._cap = cv2.VideoCapture(uri)
        if not self._cap.isOpened():
            self._cap.release()
            raise OSError(f"OpenCV could not open {uri!r}")

    def read(self) -> tuple[bool, np.ndarray | None, tuple[int, ...] | None]:
        import cv2

        ok, img = self._cap.read()
        if not ok and self._loop and self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            ok, img = self._cap.read()
        return ok, img, None  # grey frames are converted by as_bgr, for every source

    def release(self) -> None:
        self._cap.release()


class SynthCapture:
    """The synthetic generator as an endless camera that also knows each frame's labels."""

    finite = False
    on_demand = True

    def __init__(self, uri: str) -> None:
        from polymorphd.models.data.synth import SynthStream

        cfg, stream_seed = _synth_config(uri)
        stream = SynthStream(cfg, seed=stream_seed)
        self.class_names = list(stream.class_names)
        self._it = iter(stream)

    def read(self) -> tuple[bool, np.ndarray | None, tuple[int, ...] | None]:
        f = next(self._it)
        return True, f.image, tuple(int(c) for c in f.labels)

    def release(self) -> None:
        self._it = iter(())


def _synth_config(uri: str) -> tuple[Any, int]:
    """(SynthConfig, stream seed) from a synthetic: URI; SynthConfig raises ConfigError for bad values."""
    from polymorphd.models.data.synth import SynthConfig

    args = parse_synthetic(uri)
    renames = {"classes": "num_classes", "contexts": "num_contexts", "width": "width", "height": "height"}
    kwargs: dict[str, Any] = {renames[k]: int(v) for k, v in args.items() if k in renames}
    kwargs["seed"] = int(args.get("seed", 0))
    if args.get("background"):
        kwargs["background"] = args["background"]
    return SynthConfig(**kwargs), int(args.get("stream_seed", 0))


def open_capture(uri: str, loop: bool = False, read_timeout_s: float | None = None) -> Capture:
    """The default opener: a synthetic stream or an OpenCV capture."""
    if uri.startswith("synthetic:"):
        return SynthCapture(uri)
    return CvCapture(uri, loop, read_timeout_s)


def as_bgr(img: object) -> np.ndarray:
    """A camera's frame as (H, W, 3) uint8 BGR: grey (H, W) / (H, W, 1) and BGRA are converted; anything else
    (another dtype, rank or channel count, an empty image) raises ValueError saying what arrived."""
    if not isinstance(img, np.ndarray):
        raise ValueError(f"frame is a {type(img).__name__}, not an image array")
    if img.dtype != np.uint8:
        raise ValueError(f"frame has dtype {img.dtype}, expected uint8")
    if img.ndim == 3 and img.shape[2] in (1, 3, 4):
        channels = img.shape[2]
    elif img.ndim == 2:
        channels = 1
    else:
        raise ValueError(f"frame has shape {img.shape}, expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"frame has shape {img.shape}: too small to be an image")
    if channels == 3:
        return img
    import cv2

    code = cv2.COLOR_GRAY2BGR if channels == 1 else cv2.COLOR_BGRA2BGR
    return cv2.cvtColor(img if img.ndim == 2 or channels == 4 else img[:, :, 0], code)


def preflight(uri: str) -> None:
    """Fail at start, not in the reconnect loop, for problems no retry can fix."""
    kind = source_kind(uri)
    if kind == "gst":
        import cv2

        info = cv2.getBuildInformation()
        if "GStreamer:" in info and "GStreamer:                   NO" in info.replace("\t", " "):
            raise ConfigError(
                f"source {uri!r}: this OpenCV was built without GStreamer; install a GStreamer-enabled OpenCV "
                "(JetPack's python3-opencv) or use a /dev/videoN or file source"
            )
    if kind == "synthetic":
        try:
            _synth_config(uri)
        except ImportError as exc:
            raise ConfigError(f"source {uri!r}: the synthetic generator is unavailable: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"source {uri!r}: {exc}") from exc


class FrameSource:
    """Capture thread + one-frame buffer. get() hands the newest frame to the frame loop."""

    def __init__(
        self,
        uri: str,
        *,
        fps: float = 0.0,
        loop: bool = False,
        drop_policy: Literal["drop-oldest", "block"] = "drop-oldest",
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 1.0,
        stall_s: float = 5.0,
        opener: Opener | None = None,
    ) -> None:
        self.uri = uri
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._loop = loop
        self._block = drop_policy == "block"
        self._backoff0, self._backoff_max = reconnect_initial_s, reconnect_max_s
        self._stall_s = stall_s
        self._opener: Opener = opener or (lambda uri, loop: open_capture(uri, loop, stall_s))
        self._preflight = opener is None or opener is open_capture
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state: SourceState = "starting"
        self._frames = self._dropped = self._dropped_unreported = self._reconnects = self._bad = 0
        self._last_error: str | None = None
        self._last_frame = time.monotonic()  # of the last good frame (or of start), for "stalled"
        self._times: deque[float] = deque(maxlen=32)

    @classmethod
    def from_config(cls, cfg: DaemonConfig, opener: Opener | None = None) -> FrameSource:
        return cls(
            cfg.source,
            fps=cfg.source_fps,
            loop=cfg.loop,
            drop_policy=cfg.drop_policy,
            reconnect_initial_s=cfg.reconnect.initial_s,
            reconnect_max_s=cfg.reconnect.max_s,
            stall_s=cfg.stall_s,
            opener=opener,
        )

    def start(self) -> None:
        if self._preflight:
            preflight(self.uri)
        self._thread = threading.Thread(target=self._run, name="polymorphd-capture", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "capture thread for %s did not stop within %.1f s (blocked in a read)", self.uri, timeout
                )
        if self.state != "ended":
            self.state = "stopped"

    def get(self, timeout: float) -> Frame | None:
        """The newest unread frame, or None after timeout."""
        with self._cond:
            if self._slot is None:
                self._cond.wait(timeout)
            frame, self._slot = self._slot, None
            self._cond.notify_all()
        return frame

    def take_dropped(self) -> int:
        """Frames dropped since the previous call (for the label message's ``dropped``)."""
        with self._cond:
            n, self._dropped_unreported = self._dropped_unreported, 0
        return n

    def stats(self) -> dict[str, object]:
        t = self._times
        fps = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
        since = time.monotonic() - self._last_frame
        state = self.state
        if state == "live" and since > self._stall_s:
            state = "stalled"  # the capture thread is inside a read that does not return
        return {
            "uri": self.uri,
            "state": state,
            "frames": self._frames,
            "dropped": self._dropped,
            "bad_frames": self._bad,
            "reconnects": self._reconnects,
            "fps": round(fps, 2),
            "last_frame_s": round(since, 2),
            "last_error": self._last_error,
        }

    def _reject(self, why: str) -> None:
        """A frame the camera delivered but no engine could read: counted as dropped, never classified."""
        with self._cond:
            self._bad += 1
            self._dropped += 1
            self._dropped_unreported += 1
        self._last_error = f"bad frame: {why}"
        level = logging.WARNING if self._bad <= 5 or self._bad % 100 == 0 else logging.DEBUG
        log.log(level, "source %s: frame rejected (%d so far): %s", self.uri, self._bad, why)

    def _put(self, frame: Frame, wait: bool) -> None:
        with self._cond:
            if wait:
                while self._slot is not None and not self._stop.is_set():
                    self._cond.wait(0.1)
            elif self._slot is not None:
                self._dropped += 1
                self._dropped_unreported += 1
            self._slot = frame
            self._cond.notify_all()

    def _fail(self, cap: Capture | None, why: str, backoff: float) -> float:
        if cap is not None:
            cap.release()
        self._last_error = why
        self._reconnects += 1
        self.state = "reconnecting"
        log.warning("source %s: %s; retrying in %.1f s", self.uri, why, backoff)
        self._stop.wait(backoff)
        return min(backoff * 2, self._backoff_max)

    def _run(self) -> None:
        cap: Capture | None = None
        backoff = self._backoff0
        next_due = last_read = float("-inf")
        try:
            while not self._stop.is_set():
                if cap is None:
                    try:
                        cap = self._opener(self.uri, self._loop)
                    except ConfigError as exc:  # no retry can fix a bad URI or a bad generator setting
                        self.state, self._last_error = "ended", str(exc)
                        log.error("source %s cannot be opened, giving up: %s", self.uri, exc)
                        return
                    except Exception as exc:  # any other open failure is retried: cameras come and go
                        backoff = self._fail(None, f"cannot open: {exc}", backoff)
                        continue
                if self._period:
                    # Keep to a schedule (late wake-ups are made up, so the rate holds under load) but
                    # never read twice within half a period: a slow read must not be followed by a burst.
                    due = max(next_due, last_read + self._period / 2)
                    self._stop.wait(max(0.0, due - time.monotonic()))
                    last_read = time.monotonic()
                    next_due = max(next_due + self._period, last_read)
                t0 = time.perf_counter()
                try:
                    ok, img, truth = cap.read()
                except StopIteration:
                    ok, img, truth = False, None, None
                except Exception as exc:
                    backoff = self._fail(cap, f"read failed: {exc}", backoff)
                    cap = None
                    continue
                if not ok or img is None:
                    if cap.finite:
                        cap.release()
                        cap = None
                        self.state = "ended"
                        self._last_error = "end of file"
                        log.info("source %s ended (end of file; set loop: true to repeat it)", self.uri)
                        return
                    backoff = self._fail(cap, "no frame (source failed or ended)", backoff)
                    cap = None
                    continue
                read_ms = (time.perf_counter() - t0) * 1e3
                try:
                    img = as_bgr(img)
                except ValueError as exc:
                    self._reject(str(exc))
                    continue
                self._last_frame = time.monotonic()
                if self.state != "live":
                    log.info("source %s is live", self.uri)
                self.state = "live"
                backoff = self._backoff0
                self._times.append(time.monotonic())
                # Racing ahead of the loop on an on-demand source only makes frames to drop, and on 2 cores
                # its GIL holding delays the loop after every ONNX Runtime call: wait for the slot instead.
                paced = self._block or (not self._period and getattr(cap, "on_demand", False))
                self._put(Frame(img, time.time_ns(), self._frames, read_ms, truth), paced)
                self._frames += 1
        finally:
            if cap is not None:
                cap.release()
