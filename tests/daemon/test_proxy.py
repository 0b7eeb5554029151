"""XSUB/XPUB proxy: daemons connect their PUB to the frontend, subscribers to the backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import zmq

from polymorphd.daemon.proxy import Proxy
from polymorphd.daemon.publish import Publisher
from tests.daemon.fakes import Sub


def test_two_daemons_through_one_proxy(tmp_path):
    ctx = zmq.Context()
    proxy = Proxy(f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back", ctx)
    proxy.start()
    pubs = [Publisher(ctx, f"connect:ipc://{tmp_path}/front", cam) for cam in ("a", "b")]
    sub = Sub(f"ipc://{tmp_path}/back", "status/", ctx)
    seen: set[str] = set()
    deadline = time.monotonic() + 5
    while seen != {"status/a", "status/b"}:
        assert time.monotonic() < deadline, seen
        for p in pubs:
            p.publish_status({"state": "running"})
        if sub.sock.poll(10):
            seen.add(sub.recv()[0])
    sub.close()
    for p in pubs:
        p.close()
    proxy.stop()
    ctx.term()


def test_cli_proxy_exits_0_on_sigterm(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "polymorphd.daemon.cli",
        "proxy",
        "--frontend",
        f"ipc://{tmp_path}/f",
        "--backend",
        f"ipc://{tmp_path}/b",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "publishers connect to" in proc.stdout.readline()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
