"""The real daemon as a subprocess, with torch unimportable (as on the board), driven by its real clients.

One daemon (synthetic source, the tiny exported bundle) serves the tests in file order: stream schema and
heartbeats, hot swaps, a corrupt load, bad control requests, the CLI clients, sd_notify, then SIGTERM. A second
daemon reads an MJPEG-over-HTTP camera that the test kills and brings back. Every wait is bounded and every
process is killed in teardown, whatever happens.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq

from polymorphd.daemon.control import request
from tests.helpers import LABEL_FIELDS, ROOT, module_without_torch

pytestmark = pytest.mark.slow

CAMERA = "e2e"
SYNTH = "synthetic:?classes=10&contexts=3&width=64&height=64"


def wait_until(what: str, cond: Callable[[], Any], timeout: float, log: Callable[[], str] = str) -> Any:
    """cond()'s first truthy value; fails the test (with the daemon's log) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:g} s\n--- daemon log (tail) ---\n{log()}")
        time.sleep(0.02)
    return value


class Recorder:
    """Every [topic, payload] of a label stream, from a SUB socket that connects before the daemon binds."""

    def __init__(self, endpoint: str) -> None:
        self._messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop, connected = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, connected), daemon=True)
        self._thread.start()
        assert connected.wait(10), "recorder socket did not start"

    def _run(self, endpoint: str, connected: threading.Event) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # join within 10 ms of the daemon binding
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        connected.set()
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    topic, payload = sock.recv_multipart()
                    with self._lock:
                        self._messages.append((topic.decode(), json.loads(payload)))
        finally:
            sock.close(0)
            ctx.term()

    def messages(self, since: int = 0) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return self._messages[since:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def labels(self, since: int = 0) -> list[dict[str, Any]]:
        return [p for t, p in self.messages(since) if t == f"labels/{CAMERA}"]

    def statuses(self, since: int = 0) -> list[dict[str, Any]]:
        return [p for t, p in self.messages(since) if t == f"status/{CAMERA}"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class NotifyListener:
    """A fake $NOTIFY_SOCKET: an AF_UNIX datagram socket that keeps what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self.datagrams: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue

    def seen(self, word: str) -> list[str]:
        return [d for d in list(self.datagrams) if word in d.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class Served:
    """``polymorphd serve`` in a subprocess where torch cannot be imported, with its stream and sd_notify."""

    def __init__(self, workdir: Path, *serve_args: str) -> None:
        self.pub, self.ctl = f"ipc://{workdir}/pub", f"ipc://{workdir}/ctl"
        self.notify = NotifyListener(workdir / "notify")
        self.stream = Recorder(self.pub)
        self._log_path = workdir / "daemon.log"
        self._log = self._log_path.open("wb")  # a file, not a pipe: nobody reads it while the daemon runs
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "1000000"}
        argv = module_without_torch(
            "polymorphd.daemon.cli", "-v", "serve", "--pub", self.pub, "--ctl", self.ctl, "--camera", CAMERA
        )
        self.proc = subprocess.Popen(
            [*argv, *serve_args], stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode} before READY=1\n{self.log()}")
            return bool(self.notify.seen("READY=1"))

        wait_until("READY=1", ready, timeout, self.log)

    def request(self, req: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        reply = request(self.ctl, req, timeout)
        assert reply is not None, f"no reply to {req} within {timeout} s\n{self.log()}"
        return reply

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A runtime CLI command (torch blocked too) against this daemon."""
        argv = module_without_torch("polymorphd.daemon.cli", *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def wait_labels(self, what: str, pred: Callable[[dict[str, Any]], bool], n: int, since: int = 0) -> list:
        """Label messages (from index since) once n of them satisfy pred."""
        return wait_until(
            what,
            lambda: (got := self.stream.labels(since)) and sum(map(pred, got)) >= n and got,
            60,
            self.log,
        )

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self.stream.close()
            self.notify.close()
            self._log.close()


def bundle_id(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    return f"{m['bundle_id']}@{m['version']}"


@pytest.fixture(scope="module")
def bundles(tiny_bundle: Path, swap_bundle: Path, tmp_path_factory) -> dict[str, Path]:
    """base (v1), adapters (v2, same base), full (the base's next version, v3), corrupt (one flipped byte)."""
    root = tmp_path_factory.mktemp("e2e-bundles")
    full = Path(shutil.copytree(tiny_bundle, root / "tiny-v3"))
    manifest = json.loads((full / "manifest.json").read_text())  # the manifest is not in its own hash list
    (full / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    corrupt = Path(shutil.copytree(tiny_bundle, root / "corrupt"))
    data = bytearray((corrupt / "segment_1.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (corrupt / "segment_1.onnx").write_bytes(bytes(data))
    return {"base": tiny_bundle, "adapters": swap_bundle, "full": full, "corrupt": corrupt}


@pytest.fixture(scope="module")
def served(bundles: dict[str, Path], tmp_path_factory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("e2e")
    config = work / "serve.yaml"  # flags override the file; threads: 1 leaves a core for the test
    config.write_text("threads: 1\nwarmup_runs: 1\n")
    daemon = Served(
        work, "--config", str(config), "--bundle", str(bundles["base"]), "--source", SYNTH, "--fps", "40"
    )
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.close()


def test_stream_schema_start_status_and_heartbeats(served: Served, bundles: dict[str, Path]) -> None:
    base = bundle_id(bundles["base"])
    labels = served.wait_labels("30 label messages", lambda p: True, 30)
    seqs = [p["seq"] for p in labels]
    assert seqs == list(range(len(seqs))), "the recorder joined before the first frame: seq 0, 1, 2, ..."
    for p in labels:
        assert set(p) >= LABEL_FIELDS and p["v"] == 1 and p["camera"] == CAMERA and p["bundle"] == base
        assert set(p["latency_ms"]) == {"capture", "preprocess", "inference", "total"}
        assert p["latency_ms"]["total"] >= p["latency_ms"]["inference"] >= 0
        assert p["pub_ts"] >= p["frame_ts"] > 0
        assert p["exit"] in (0, 1, "final") and set(p["adapters"]) <= {0, 1, 2}
        assert (p["energy_mj"] is None) == (p["energy_source"] == "none")
        assert isinstance(p["dropped"], int) and p["dropped"] >= 0
        for lab in p["labels"]:
            assert set(lab) == {"id", "name", "score"} and lab["name"] == f"class{lab['id']}"
            assert 0.0 <= lab["score"] <= 1.0
    assert any(p["labels"] for p in labels), "a random tiny model still puts some class over 0.45"

    first = served.stream.statuses()[0]  # published by start(), before the frame loop runs
    assert first["state"] == "running" and first["frames"] == 0 and first["bundle"] == base
    assert first["pid"] == served.proc.pid and first["source"]["uri"] == SYNTH
    statuses = wait_until(
        "status messages spanning 3 s",
        lambda: (s := served.stream.statuses()) and s[-1]["pub_ts"] - s[0]["pub_ts"] >= 3e9 and s,
        30,
        served.log,
    )
    gaps_s = [(b["pub_ts"] - a["pub_ts"]) / 1e9 for a, b in itertools.pairwise(statuses)]
    assert max(gaps_s) <= 2.0, f"heartbeat gaps {gaps_s}"
    assert all(s["state"] == "running" for s in statuses)
    assert [s["source"]["state"] for s in statuses][-1] == "live"  # "starting" until the generator is set up

    maps = Path(f"/proc/{served.proc.pid}/maps")
    if maps.exists():  # the launcher blocks the import; nothing may have loaded the library another way
        assert "libtorch" not in maps.read_text()


def test_hot_swaps_while_streaming(served: Served, bundles: dict[str, Path]) -> None:
    base, adapters, full = (bundle_id(bundles[k]) for k in ("base", "adapters", "full"))
    current = served.request({"cmd": "status"})["bundle"]
    assert current == base, "this test expects the daemon as started"
    mark = len(served.stream)

    reply = served.request({"cmd": "load", "path": str(bundles["adapters"])})
    assert reply == {"ok": True, "bundle": adapters, "previous": base}
    served.wait_labels(f"labels from {adapters}", lambda p: p["bundle"] == adapters, 5, mark)
    reply = served.request({"cmd": "load", "path": str(bundles["full"])})
    assert reply == {"ok": True, "bundle": full, "previous": adapters}
    labels = served.wait_labels(f"labels from {full}", lambda p: p["bundle"] == full, 5, mark)

    steps = [b - a for a, b in itertools.pairwise(p["seq"] for p in labels)]
    assert steps and all(1 <= s <= 2 for s in steps), f"seq steps {steps}: a gap of more than one frame"
    served_bundles = [k for k, _ in itertools.groupby(p["bundle"] for p in labels)]
    assert served_bundles == [base, adapters, full]
    assert all(set(p["adapters"]) <= {0, 1} for p in labels if p["bundle"] == adapters)  # its 2 contexts
    stats = served.request({"cmd": "stats"})
    assert stats["ok"] and stats["frame_errors"] == 0 and stats["previous"] == adapters


def test_corrupt_bundle_is_refused_and_the_stream_continues(served: Served, bundles: dict[str, Path]) -> None:
    before = served.request({"cmd": "status"})
    mark = len(served.stream)
    proc = served.cli("ctl", "--endpoint", served.ctl, "load", str(bundles["corrupt"]))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and "segment_1.onnx" in reply["error"]
    assert "error: " in proc.stderr and "segment_1.onnx" in proc.stderr

    labels = served.wait_labels("5 labels after the refused load", lambda p: True, 5, mark)
    seqs = [p["seq"] for p in labels]
    assert seqs == sorted(seqs) and seqs[-1] > before["seq"]
    assert {p["bundle"] for p in labels} == {before["bundle"]}
    after = served.request({"cmd": "status"})
    assert after["bundle"] == before["bundle"] and after["previous"] == before["previous"]
    assert after["frame_errors"] == 0


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"cmd": "explode"}', "unknown cmd 'explode'"),
        (b'{"cmd": "load"}', 'load needs "path"'),
        (b'{"cmd": "load", "path": "/nonexistent/bundle"}', "/nonexistent/bundle"),
        (b'{"cmd": "status", "verbose": 1}', "status takes no argument(s) ['verbose']"),
        (b'{"cmd": "set"}', "set needs at least one knob"),
        (b'{"cmd": "set", "max_adapters": "lots"}', "knob max_adapters: expected a number, got 'lots'"),
        (b'{"cmd": "set", "exit0_lo": 2}', "exit 0 thresholds lo=2"),
        (b'{"cmd": "set", "warp": 9}', "unknown knob 'warp'"),
    ],
)
def test_malformed_control_requests_get_ok_false(served: Served, raw: bytes, error: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(served.ctl)
        sock.send(raw)
        assert sock.poll(30_000), f"no reply to {raw!r}\n{served.log()}"
        reply = json.loads(sock.recv())
    finally:
        sock.close(0)
    assert reply["ok"] is False and error in reply["error"], reply
    status = served.request({"cmd": "status"})
    assert status["state"] == "running" and status["frame_errors"] == 0


def test_cli_subscribe_and_ctl_status(served: Served) -> None:
    proc = served.cli(
        "subscribe",
        "--endpoint",
        served.pub,
        "--topic",
        f"labels/{CAMERA}",
        "--count",
        "3",
        "--timeout",
        "30",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 3
    assert all(m["topic"] == f"labels/{CAMERA}" and set(m) >= LABEL_FIELDS for m in lines)
    assert [m["seq"] for m in lines] == list(range(lines[0]["seq"], lines[0]["seq"] + 3))

    proc = served.cli("subscribe", "--endpoint", served.pub, "--topic", "status/", "--count", "1")
    assert proc.returncode == 0, proc.stderr
    status_line = json.loads(proc.stdout)
    assert status_line["topic"] == f"status/{CAMERA}" and status_line["state"] == "running"

    proc = served.cli("ctl", "--endpoint", served.ctl, "status")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["ok"] is True and status["state"] == "running" and status["pid"] == served.proc.pid
    assert status["bundle"] == served.stream.labels()[-1]["bundle"] and status["frames"] > 0
    assert status["source"]["state"] == "live" and status["mode"] == "polymorph"


def test_sd_notify_ready_and_watchdog(served: Served, bundles: dict[str, Path]) -> None:
    first = served.notify.datagrams[0].splitlines()
    assert first[0] == "READY=1" and first[1].startswith(f"STATUS={bundle_id(bundles['base'])}")
    n = len(served.notify.seen("WATCHDOG=1"))  # WATCHDOG_USEC=1 s: a ping every 0.5 s from the frame loop
    wait_until("two more WATCHDOG=1", lambda: len(served.notify.seen("WATCHDOG=1")) >= n + 2, 30, served.log)


def test_sigterm_stops_cleanly_with_a_final_status(served: Served) -> None:
    """Last for the shared daemon: it stops it."""
    served.wait_labels("a label message", lambda p: True, 1)
    served.proc.send_signal(signal.SIGTERM)
    try:
        code = served.proc.wait(2.0)  # the contract (docs/deploy.md): exits within 2 s
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 2 s after SIGTERM\n{served.log()}")
    assert code == 0, served.log()
    final = wait_until(
        "the final status",
        lambda: [s for s in served.stream.statuses() if s["state"] == "stopped"],
        5,
        served.log,
    )[-1]
    last = served.stream.labels()[-1]
    assert final["seq"] == last["seq"] + 1 and final["frames"] == last["seq"] + 1
    assert served.notify.seen("STOPPING=1")
    assert f"stopped after {final['frames']} frames" in served.log()


class MjpegCamera:
    """An IP camera: MJPEG over HTTP (multipart/x-mixed-replace), as many network cameras serve it."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        dead = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for i in itertools.count():
                    if dead.is_set():
                        return
                    img = np.zeros((48, 64, 3), np.uint8)
                    img[:, (i * 4) % 64 :] = (40, 120, 200)
                    jpg = cv2.imencode(".jpg", img)[1].tobytes()
                    head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                    try:
                        self.wfile.write(head + jpg + b"\r\n")
                    except OSError:
                        return
                    time.sleep(0.02)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._server.dead = dead  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]  # the same port when it comes back
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def stop(self) -> None:
        """Unplugged: open streams end mid-stream, new connections are refused."""
        if self._server is not None:
            self._server.dead.set()  # type: ignore[attr-defined]
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def test_camera_that_dies_comes_back(bundles: dict[str, Path], tmp_path: Path) -> None:
    camera = MjpegCamera()
    camera.start()
    config = tmp_path / "camera.yaml"
    config.write_text(
        f"source: {camera.url}\nbundle: {bundles['base']}\nthreads: 1\nwarmup_runs: 0\n"
        "heartbeat_s: 0.2\nreconnect: {initial_s: 0.1, max_s: 0.4}\n"
    )
    daemon = Served(tmp_path, "--config", str(config))
    try:
        daemon.wait_ready()
        daemon.wait_labels("labels from the camera", lambda p: True, 5)

        camera.stop()
        mark = len(daemon.stream)
        down = wait_until(
            "a reconnecting status while the camera is gone",
            lambda: [
                s
                for s in daemon.stream.statuses(mark)
                if s["source"]["state"] == "reconnecting"
                and "cannot open" in (s["source"]["last_error"] or "")
            ],
            30,
            daemon.log,
        )[0]
        last_seq = daemon.stream.labels()[-1]["seq"]

        camera.start()
        mark = len(daemon.stream)
        wait_until(
            "a live status after the camera came back",
            lambda: any(s["source"]["state"] == "live" for s in daemon.stream.statuses(mark)),
            30,
            daemon.log,
        )
        resumed = daemon.wait_labels("labels after the camera came back", lambda p: True, 5, mark)
        assert [p["seq"] for p in resumed[:5]] == list(range(last_seq + 1, last_seq + 6))  # seq just goes on
        status = daemon.request({"cmd": "status"})
        assert status["state"] == "running" and status["source"]["state"] == "live"
        assert status["source"]["reconnects"] >= down["source"]["reconnects"] >= 1
        assert status["frame_errors"] == 0
    finally:
        daemon.close()
        camera.stop()
    assert daemon.proc.returncode == 0, daemon.log()
