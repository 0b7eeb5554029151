"""Fleet fan-out: two real daemons publish through `polymorphd proxy` to one subscriber (processes, torch-free)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from tests.helpers import module_without_torch

pytestmark = pytest.mark.slow


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        module_without_torch("polymorphd.daemon.cli", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_two_daemons_behind_one_proxy_reach_one_subscriber(tiny_bundle: Path, tmp_path: Path) -> None:
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"
    procs = [_spawn("proxy", "--frontend", front, "--backend", back)]
    for cam in ("left", "right"):
        procs.append(_spawn(
            "serve", "--bundle", str(tiny_bundle), "--source", "synthetic:?classes=10", "--camera", cam,
            "--pub", f"connect:{front}", "--ctl", f"ipc://{tmp_path}/ctl-{cam}", "--fps", "20",
        ))  # fmt: skip
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(back)
    sub.setsockopt(zmq.SUBSCRIBE, b"labels/")
    seqs: dict[str, list[int]] = {}
    try:
        deadline = time.monotonic() + 60
        while not all(len(seqs.get(c, [])) >= 5 for c in ("left", "right")):
            assert time.monotonic() < deadline, (
                f"labels seen per camera: { {c: len(s) for c, s in seqs.items()} }"
            )
            for p in procs:
                assert p.poll() is None, p.stderr.read().decode()[-2000:]
            if sub.poll(200):
                topic, payload = sub.recv_multipart()
                msg = json.loads(payload)
                assert topic.decode() == f"labels/{msg['camera']}"
                seqs.setdefault(msg["camera"], []).append(msg["seq"])
        for cam, got in seqs.items():
            assert got == list(range(got[0], got[0] + len(got))), (cam, got)  # consecutive per camera
    finally:
        sub.close(0)
        ctx.term()
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0]
