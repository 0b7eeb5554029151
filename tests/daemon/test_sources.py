"""Capture thread: latest-frame buffer, drop counting, reconnect with backoff, files, synthetic."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from polymorphd.daemon.sources import FrameSource, open_capture, preflight
from polymorphd.models.core.errors import ConfigError
from tests.daemon.fakes import FlakyOpener


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def source(opener, **kw) -> FrameSource:
    kw.setdefault("reconnect_initial_s", 0.005)
    kw.setdefault("reconnect_max_s", 0.02)
    src = FrameSource("fake:", opener=opener, **kw)
    src.start()
    return src


def test_drop_oldest_keeps_the_newest_frame_and_counts_drops():
    src = source(FlakyOpener(length=10))
    wait_for(lambda: src.state == "ended")
    f = src.get(1.0)
    assert f is not None and f.index == 9 and f.truth == (9 % 6,)
    assert f.image.shape == (12, 16, 3) and f.read_ms >= 0 and f.ts_ns > 0
    assert src.take_dropped() == 9 and src.take_dropped() == 0  # "since the previous message"
    st = src.stats()
    assert st["dropped"] == 9 and st["frames"] == 10 and st["state"] == "ended"
    assert src.get(0.01) is None
    src.stop()
    assert src.state == "ended"


def test_block_policy_loses_nothing():
    src = source(FlakyOpener(length=6), drop_policy="block")
    got = [src.get(2.0) for _ in range(6)]
    assert [f.index for f in got] == list(range(6))
    wait_for(lambda: src.state == "ended")
    assert src.stats()["dropped"] == 0
    src.stop()


def test_source_that_dies_mid_stream_reconnects():
    opener = FlakyOpener(dead={4, 5, 6})
    src = source(opener, drop_policy="block")
    frames = [src.get(2.0) for _ in range(8)]
    src.stop()
    assert all(f is not None for f in frames)
    assert [int(f.image[0, 0, 0]) for f in frames] == [(n * 37) % 256 for n in (0, 1, 2, 3, 7, 8, 9, 10)]
    st = src.stats()
    assert st["reconnects"] == 3 and opener.opens == 4 and opener.releases >= 3
    assert "no frame" in st["last_error"]
    assert st["state"] == "stopped"


def test_open_failures_back_off_then_go_live():
    opener = FlakyOpener(fail_opens=3)
    src = source(opener)
    assert src.get(2.0) is not None
    wait_for(lambda: src.state == "live")
    st = src.stats()
    src.stop()
    assert opener.opens == 4 and st["reconnects"] == 3 and "scripted failure 3" in st["last_error"]


def test_backoff_doubles_up_to_max(monkeypatch):
    waits = []
    src = FrameSource(
        "fake:", opener=FlakyOpener(fail_opens=6), reconnect_initial_s=0.001, reconnect_max_s=0.004
    )
    real_wait = src._stop.wait
    monkeypatch.setattr(src._stop, "wait", lambda t=None: waits.append(t) or real_wait(0))
    src.start()
    assert src.get(2.0) is not None
    src.stop()
    assert waits[:6] == [0.001, 0.002, 0.004, 0.004, 0.004, 0.004]


def _write_video(path: Path, n: int) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 24))
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((24, 32, 3), i * 20, np.uint8))
    w.release()
    return path


def test_video_file_ends_without_loop(tmp_path):
    path = _write_video(tmp_path / "clip.avi", 5)
    src = FrameSource(str(path), drop_policy="block")
    src.start()
    frames = [src.get(2.0) for _ in range(5)]
    wait_for(lambda: src.state == "ended")
    src.stop()
    assert [f.index for f in frames] == list(range(5)) and frames[0].image.shape == (24, 32, 3)
    assert frames[0].truth is None
    assert src.stats()["last_error"] == "end of file" and src.stats()["reconnects"] == 0


def test_video_file_loops(tmp_path):
    path = _write_video(tmp_path / "clip.avi", 3)
    src = FrameSource(str(path), loop=True, drop_policy="block")
    src.start()
    frames = [src.get(2.0) for _ in range(7)]
    src.stop()
    assert [f.index for f in frames] == list(range(7))
    means = [round(float(f.image.mean()) / 20) for f in frames]
    assert means == [0, 1, 2, 0, 1, 2, 0]


def test_unopenable_device_reports_reconnecting(tmp_path):
    src = FrameSource(str(tmp_path / "not-a-video.avi"), reconnect_initial_s=0.01, reconnect_max_s=0.01)
    src.start()
    wait_for(lambda: src.stats()["reconnects"] >= 2)
    st = src.stats()
    src.stop()
    assert st["state"] == "reconnecting" and "could not open" in st["last_error"]


def test_gst_without_gstreamer_fails_at_start():
    if "GStreamer:                   YES" in cv2.getBuildInformation():
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(ConfigError, match="built without GStreamer"):
        preflight("gst:videotestsrc ! appsink")


def test_synthetic_source_carries_truth():
    synth = pytest.importorskip("polymorphd.models.data.synth")
    cap = open_capture("synthetic:?seed=1&classes=8&contexts=2&width=64&height=48")
    ok, img, truth = cap.read()
    cap.release()
    assert ok and img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert all(0 <= t < 8 for t in truth)
    cfg = synth.SynthConfig(num_classes=8, num_contexts=2, width=64, height=48, seed=1)
    assert cap.class_names == synth.class_names(cfg)


def test_synthetic_settings_are_checked_at_start():
    pytest.importorskip("polymorphd.models.data.synth")
    with pytest.raises(ConfigError, match=r"synthetic:\?classes=0'.*num_classes"):
        preflight("synthetic:?classes=0")


def test_an_open_error_no_retry_can_fix_ends_the_source():
    def opener(uri, loop):
        raise ConfigError("bad generator setting")

    src = source(opener)
    wait_for(lambda: src.state == "ended")
    src.stop()
    assert src.stats()["last_error"] == "bad generator setting" and src.stats()["reconnects"] == 0


def test_rate_limit_never_reads_twice_within_half_a_period():
    """A lower bound only (load can only stretch intervals): slow reads are not followed by a burst."""
    stamps: list[float] = []
    opener = FlakyOpener()

    def timed(uri, loop):
        cap = opener(uri, loop)
        read = cap.read

        def slow_sometimes():
            stamps.append(time.monotonic())
            if len(stamps) % 3 == 0:
                time.sleep(0.025)  # longer than the period: the schedule falls behind
            return read()

        cap.read = slow_sometimes
        return cap

    src = source(timed, fps=100.0, drop_policy="block")
    for _ in range(10):
        assert src.get(2.0) is not None
    src.stop()
    gaps = np.diff(stamps[:10])
    assert gaps.min() >= 0.005 - 1e-4, gaps


class _Generator:
    """An on-demand capture (like synthetic: or a file) that counts its reads."""

    finite, on_demand = False, True

    def __init__(self) -> None:
        self.reads = 0

    def read(self):
        self.reads += 1
        return True, np.full((4, 4, 3), self.reads % 256, np.uint8), None

    def release(self) -> None:
        pass


@pytest.mark.parametrize("fps", [0.0, 200.0])
def test_on_demand_source_at_unlimited_rate_waits_for_the_loop(fps):
    """Racing ahead would only make frames to drop (and hold the GIL the frame loop needs)."""
    gen = _Generator()
    src = source(lambda uri, loop: gen, fps=fps)
    taken = [src.get(2.0) for _ in range(3)]
    time.sleep(0.1)  # the loop busy with a frame: 20 periods at 200 fps
    taken.append(src.get(2.0))
    src.stop()
    assert all(f is not None for f in taken)
    if fps:  # rate-limited, it is a camera: it keeps reading and drops what the loop did not take
        assert gen.reads > 8 and src.stats()["dropped"] > 0
    else:  # taken + one waiting in the slot + at most one being read
        assert gen.reads <= len(taken) + 2 and src.stats()["dropped"] == 0
        assert [f.index for f in taken] == list(range(4))


def test_synthetic_and_file_captures_are_on_demand(tmp_path):
    pytest.importorskip("polymorphd.models.data.synth")
    assert open_capture("synthetic:?classes=4&contexts=2&width=32&height=32").on_demand
    assert open_capture(str(_write_video(tmp_path / "clip.avi", 2))).on_demand
