"""Test doubles for the daemon: an engine on the daemon's engine seam, fake bundles, scripted cameras."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import zmq

from polymorphd.daemon.app import Daemon
from polymorphd.daemon.config import DaemonConfig
from polymorphd.daemon.power import Meter
from polymorphd.daemon.publish import decode
from polymorphd.models.core.errors import BundleError, ConfigError

CLASSES = ["person", "car", "dog", "bike", "tree", "sign"]


@dataclass
class FrameResult:
    probs: np.ndarray
    labels: list[int]
    exit: int | Literal["final"]
    adapters: list[int]
    preprocess_ms: float
    inference_ms: float
    infer_t0_ns: int
    infer_t1_ns: int
    count: float | None = None


class FakeEngine:
    """Deterministic scores from the frame's mean pixel; knobs validated like the real engine's.

    A ``daemon.seam.Engine``, like the real one: test_seam.py checks both, member by member.
    """

    KNOBS: ClassVar[dict[str, type]] = {"max_adapters": int, "threshold": float, "mode": str}

    def __init__(
        self,
        bundle_id: str = "fake@1",
        classes: list[str] | None = None,
        base_sha256: str = "base0",
        delay_s: float = 0.0,
    ) -> None:
        self.bundle_id, self.base_sha256 = bundle_id, base_sha256
        self.classes = list(classes or CLASSES)
        self.delay_s = delay_s
        self._knobs: dict[str, Any] = {"max_adapters": 2, "threshold": 0.5, "mode": "polymorph"}
        self.closed = False
        self.infers = 0

    def new_state(self) -> dict[str, int]:
        return {"frames": 0}

    def infer(
        self, frame_bgr: np.ndarray, state: dict[str, int], mel: np.ndarray | None = None
    ) -> FrameResult:
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or min(frame_bgr.shape[:2]) < 4:
            raise ValueError(f"frame shape {frame_bgr.shape}: expected (H >= 4, W >= 4, 3) uint8 BGR")
        assert not self.closed, f"{self.bundle_id} used after close()"
        t0 = time.monotonic_ns()
        if self.delay_s:
            time.sleep(self.delay_s)
        m = float(frame_bgr.mean()) / 255.0
        k = len(self.classes)
        probs = ((m + np.arange(k) / k) % 1.0).astype(np.float32)
        labels = [int(i) for i in np.flatnonzero(probs > self._knobs["threshold"])]
        state["frames"] += 1
        self.infers += 1
        t1 = time.monotonic_ns()
        return FrameResult(probs, labels, 0 if m < 0.5 else "final", [] if m < 0.5 else [1], 0.1, 0.2, t0, t1)

    def set_knobs(self, **knobs: Any) -> dict[str, Any]:
        for key, value in knobs.items():
            if key not in self.KNOBS:
                raise ConfigError(f"unknown knob {key!r}; known: {sorted(self.KNOBS)}")
            if not isinstance(value, self.KNOBS[key]) or isinstance(value, bool):
                raise ConfigError(f"knob {key}={value!r}: expected {self.KNOBS[key].__name__}")
        self._knobs.update(knobs)
        return dict(self._knobs)

    def knobs(self) -> dict[str, Any]:
        return dict(self._knobs)

    def with_adapter_bundle(self, path: str | Path, pubkey: str | None = None) -> FakeEngine:
        meta = read_bundle(path)
        if meta["base_sha256"] != self.base_sha256:
            raise BundleError(
                f"{path}: adapter bundle base {meta['base_sha256']} != running base {self.base_sha256}"
            )
        return FakeEngine(
            f"{meta['bundle_id']}@{meta['version']}", self.classes, self.base_sha256, self.delay_s
        )

    def close(self) -> None:
        self.closed = True


def make_bundle(
    root: Path,
    name: str,
    version: int = 1,
    *,
    adapter: bool = False,
    base: str = "base0",
    corrupt: bool = False,
) -> Path:
    """A directory the fake backend loads: fake.json, or garbage when corrupt."""
    d = root / f"{name}-v{version}"
    d.mkdir(parents=True)
    meta = {"bundle_id": name, "version": version, "base_sha256": base, "adapter": adapter}
    (d / "fake.json").write_text("{not json" if corrupt else json.dumps(meta))
    return d


def read_bundle(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "fake.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{f}: cannot load fake bundle: {exc}") from exc


@dataclass
class FakeBackend:
    """load_engine / is_adapter_bundle stand-ins that remember what they built."""

    delay_s: float = 0.0
    load_delay_s: float = 0.0
    engines: list[FakeEngine] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def load(self, path: str, **kwargs: Any) -> FakeEngine:
        self.calls.append({"path": str(path), **kwargs})
        meta = read_bundle(path)
        if meta["adapter"]:
            raise BundleError(f"{path}: is an adapter bundle; load it onto a running base")
        time.sleep(self.load_delay_s)
        engine = FakeEngine(
            f"{meta['bundle_id']}@{meta['version']}", base_sha256=meta["base_sha256"], delay_s=self.delay_s
        )
        self.engines.append(engine)
        return engine

    def is_adapter(self, path: str) -> bool:
        return bool(read_bundle(path)["adapter"])


class ScriptedCapture:
    """A camera reading from a shared counter; reads whose number is in `dead` fail (a cable pulled)."""

    def __init__(self, opener: FlakyOpener) -> None:
        self.finite = opener.length is not None
        self._o = opener

    def read(self) -> tuple[bool, np.ndarray | None, tuple[int, ...] | None]:
        o = self._o
        with o.lock:
            n = o.reads
            o.reads += 1
        if o.length is not None and n >= o.length:
            return False, None, None
        if n in o.dead:
            return False, None, None
        if n in o.stall:
            o.stalled.wait(30)  # a stream that hangs without closing, until the test lets it go
        if n in o.bad:
            return True, np.zeros((3, 3, 3), np.uint8), None  # a frame the (fake) engine raises on
        if n in o.corrupt:
            return (
                True,
                np.zeros((8, 8, 2), np.uint8),
                None,
            )  # no camera gives 2 channels: the source rejects it
        o.delivered += 1
        value = (n * 37) % 256
        if n in o.grey:
            return True, np.full((10, 14), value, np.uint8), (n % len(CLASSES),)
        shape = (24, 40, 3) if n in o.resized else (12, 16, 3)
        return True, np.full(shape, value, np.uint8), (n % len(CLASSES),)

    def release(self) -> None:
        self._o.releases += 1


@dataclass
class FlakyOpener:
    """Opener(uri, loop) with scripted open failures, dead reads, bad / corrupt / grey / resized frames, reads
    that hang until ``stalled`` is set, and an optional end."""

    fail_opens: int = 0
    dead: set[int] = field(default_factory=set)
    bad: set[int] = field(default_factory=set)
    corrupt: set[int] = field(default_factory=set)
    grey: set[int] = field(default_factory=set)
    resized: set[int] = field(default_factory=set)
    stall: set[int] = field(default_factory=set)
    stalled: threading.Event = field(default_factory=threading.Event)  # set it to end the stalls
    length: int | None = None
    opens: int = 0
    reads: int = 0
    delivered: int = 0
    releases: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, uri: str, loop: bool = False) -> ScriptedCapture:
        self.opens += 1
        if self.opens <= self.fail_opens:
            raise OSError(f"cannot open {uri} (scripted failure {self.opens})")
        return ScriptedCapture(self)


class Unpluggable:
    """An opener whose camera can be pulled out and put back: while out, opens fail and reads return nothing."""

    def __init__(self) -> None:
        self.present = threading.Event()
        self.present.set()
        self.opens: list[float] = []

    finite = False

    def __call__(self, uri: str, loop: bool = False) -> Unpluggable:
        self.opens.append(time.monotonic())
        if not self.present.is_set():
            raise OSError(f"{uri}: No such device")
        return self

    def read(self):
        if not self.present.is_set():
            return False, None, None
        time.sleep(0.005)
        return True, np.full((12, 16, 3), 128, np.uint8), (0,)

    def release(self) -> None:
        pass


def config(tmp_path: Path, bundle: Path, **fields: Any) -> DaemonConfig:
    base = {
        "bundle": str(bundle),
        "pub": f"ipc://{tmp_path}/pub",
        "ctl": f"ipc://{tmp_path}/ctl",
        "heartbeat_s": 0.2,
        "warmup_runs": 1,
        "source_fps": 200,
        "reconnect": {"initial_s": 0.01, "max_s": 0.05},
    }
    return DaemonConfig.model_validate({**base, **fields})


class Sub:
    """A SUB client whose every receive has a timeout."""

    def __init__(self, address: str, topic: str = "", ctx: zmq.Context | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.connect(address)

    def recv(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        assert self.sock.poll(int(timeout * 1000), zmq.POLLIN), f"no message within {timeout} s"
        topic, data = self.sock.recv_multipart()
        return topic.decode(), decode(data)

    def until(self, pred: Any, timeout: float = 5.0, limit: int = 10_000) -> list[tuple[str, dict[str, Any]]]:
        """Messages up to and including the first for which pred(topic, payload) holds."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < limit:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            got.append(msg)
            if pred(*msg):
                return got
        raise AssertionError(f"condition not met in {limit} messages")

    def close(self) -> None:
        self.sock.close(0)


@contextmanager
def running(
    cfg: DaemonConfig, backend: FakeBackend | None, opener: FlakyOpener | None = None, **kw: Any
) -> Iterator[Daemon]:
    """A started daemon with its frame loop on a thread; stopped (and checked) on exit.

    ``backend`` None: the real engine (ONNX Runtime) on real bundles."""
    d = Daemon(
        cfg,
        engine_factory=backend.load if backend else None,
        adapter_check=backend.is_adapter if backend else None,
        opener=opener or FlakyOpener(),
        meter=kw.pop("meter", Meter()),
        **kw,
    )
    d.start()
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        yield d
    finally:
        d.request_stop()
        t.join(5)
        d.stop()
        assert not t.is_alive(), "frame loop did not stop"
