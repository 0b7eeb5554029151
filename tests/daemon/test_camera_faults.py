"""Camera faults: the daemon keeps running, says what the source is doing on ``status/<camera>``, resumes when
the source comes back, and never publishes labels for a frame it did not classify. docs/RELIABILITY.md lists
them; bench/recovery.py measures the time to resume on a real engine.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from polymorphd.daemon.config import DaemonConfig
from polymorphd.daemon.control import request
from tests.daemon.fakes import (
    CLASSES,
    FakeBackend,
    FlakyOpener,
    Sub,
    Unpluggable,
    config,
    make_bundle,
    running,
)


def labels_truth(msgs) -> list[int]:
    return [p["truth"][0] for t, p in msgs if t.startswith("labels/")]


def test_a_camera_that_disappears_reports_it_and_resumes_when_it_returns(tmp_path):
    b1 = make_bundle(tmp_path / "bundles", "alpha", 1)
    cam = Unpluggable()
    # the default backoff (DaemonConfig's): what the "resume within 2 s" promise rests on
    defaults = DaemonConfig.model_fields["reconnect"].default_factory()
    assert defaults.max_s <= 1.0
    cfg = config(tmp_path, b1, reconnect=defaults.model_dump(), source_fps=0)
    with running(cfg, FakeBackend(), cam) as d:
        sub = Sub(d.publisher.address)
        sub.until(lambda t, p: t.startswith("labels/"))
        cam.present.clear()
        down = sub.until(lambda t, p: t.startswith("status/") and p["source"]["state"] == "reconnecting")
        time.sleep(2.5)  # long enough for the backoff to reach its maximum
        assert d.state == "running" and request(d.control.address, {"cmd": "status"}, 5)["ok"]
        back_at = time.time_ns()
        cam.present.set()
        msgs = sub.until(lambda t, p: t.startswith("labels/"), timeout=10)
        first = msgs[-1][1]
        status = sub.until(lambda t, p: t.startswith("status/"))[-1][1]
        sub.close()
    gaps = np.diff(cam.opens)
    assert gaps.max() <= defaults.max_s + 0.25, gaps  # reopened at least once a max_s (+ scheduling slack)
    assert down[-1][1]["source"]["last_error"] == "no frame (source failed or ended)"
    assert status["source"]["state"] == "live" and status["source"]["reconnects"] >= 3
    assert first["frame_ts"] > back_at  # the first label after the return is of a frame read after it
    resumed_s = (first["pub_ts"] - back_at) / 1e9
    print(f"resumed {resumed_s:.3f} s after the camera returned")  # bench/recovery.py records the figure
    assert resumed_s < 10


def test_a_file_that_ends_is_reported_and_the_daemon_stays_up(tmp_path):
    opener = FlakyOpener(length=20)  # a finite source: 20 frames, then the end
    with running(
        config(tmp_path, make_bundle(tmp_path, "alpha"), drop_policy="block"), FakeBackend(), opener
    ) as d:
        sub = Sub(d.publisher.address)
        msgs = sub.until(lambda t, p: t.startswith("status/") and p["source"]["state"] == "ended")
        sub.close()
        reply = request(d.control.address, {"cmd": "status"}, 5)
    assert reply["ok"] and reply["state"] == "running" and reply["source"]["last_error"] == "end of file"
    assert reply["frames"] == 20 and opener.delivered == 20
    assert labels_truth(msgs)[-1] == 19 % len(CLASSES)  # the last frame was classified, nothing after it


def test_a_stream_that_stalls_without_closing_is_reported_and_resumes(tmp_path):
    opener = FlakyOpener(stall={15})  # read 15 hangs until released
    cfg = config(tmp_path, make_bundle(tmp_path, "alpha"), stall_s=0.3, drop_policy="block")
    with running(cfg, FakeBackend(), opener) as d:
        sub = Sub(d.publisher.address)
        before = sub.until(lambda t, p: t.startswith("status/") and p["source"]["state"] == "stalled")
        during = sub.until(lambda t, p: t.startswith("status/"))  # a further heartbeat: still stalled
        released_at = time.time_ns()
        opener.stalled.set()
        after = sub.until(lambda t, p: t.startswith("status/") and p["source"]["state"] == "live")
        after += sub.until(lambda t, p: t.startswith("labels/") and p["seq"] >= 20)
        sub.close()
    assert during[-1][1]["source"]["state"] == "stalled" and during[-1][1]["source"]["last_frame_s"] >= 0.3
    assert not labels_truth(during)  # nothing published while no frame came
    resumed = [p for t, p in after if t.startswith("labels/")]
    assert resumed[0]["pub_ts"] > released_at and resumed[0]["truth"] == [15 % len(CLASSES)]
    seqs = [p["seq"] for t, p in before + during + after if t.startswith("labels/")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_corrupt_wrong_size_and_grey_frames(tmp_path):
    """Corrupt frames are rejected at the source, grey and resized ones classified; none is labelled unseen."""
    opener = FlakyOpener(stall={0}, corrupt={3, 4}, grey={6, 7}, resized={9}, bad={11})
    cfg = config(tmp_path, make_bundle(tmp_path, "alpha"), drop_policy="block")
    with running(cfg, FakeBackend(), opener) as d:
        sub = Sub(d.publisher.address)
        sub.until(lambda t, p: t.startswith("status/"))  # subscribed before the first frame is read
        opener.stalled.set()
        msgs = [m for m in sub.until(lambda t, p: p.get("seq", -1) >= 14) if m[0].startswith("labels/")]
        sub.close()
        source = d.source.stats()
        errors = d.frame_errors
    classified = [n for n in range(18) if n not in {3, 4, 11}]  # 3, 4: corrupt; 11: the engine fails on it
    assert [p["seq"] for _, p in msgs] == list(range(15))
    assert labels_truth(msgs) == [
        n % len(CLASSES) for n in classified[:15]
    ]  # seq k is the k-th frame classified
    assert source["bad_frames"] == 2 and "expected (H, W)" in source["last_error"] and errors == 1
    assert [p["dropped"] for _, p in msgs][:10] == [
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        0,
        0,
        1,
    ]  # reported with the next label


def test_a_network_stream_that_stalls_is_reopened_after_stall_s():
    """A real MJPEG-over-HTTP stream that stops sending but keeps the connection open: OpenCV's read timeout
    (stall_s) fails the read, the source reopens, and frames flow again from the new connection."""
    import cv2

    from polymorphd.daemon.sources import FrameSource

    jpg = cv2.imencode(".jpg", np.full((48, 64, 3), 100, np.uint8))[1].tobytes()
    connections = []

    class Stalling(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            connections.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
            self.end_headers()
            for _ in range(10):
                part = b"--f\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                self.wfile.write(part + jpg + b"\r\n")
                self.wfile.flush()
                time.sleep(0.01)
            time.sleep(5)  # stalls, connection open

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    src = FrameSource(
        f"http://127.0.0.1:{server.server_address[1]}/cam.mjpg",
        stall_s=0.5,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.1,
    )
    src.start()
    try:
        deadline = time.monotonic() + 20
        while len(connections) < 2 and time.monotonic() < deadline:
            src.get(0.1)
        assert len(connections) >= 2, src.stats()
        assert src.get(5.0) is not None  # frames from the new connection
        stats = src.stats()
    finally:
        src.stop(2.0)
        server.shutdown()
        server.server_close()
    assert stats["reconnects"] >= 1 and stats["last_error"] == "no frame (source failed or ended)"
    assert 0.5 <= connections[1] - connections[0] < 3.0  # 10 frames, the 0.5 s timeout, the backoff
