"""sd_notify against a fake NOTIFY_SOCKET (a bound AF_UNIX datagram socket)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from polymorphd.daemon.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def test_no_op_without_notify_socket():
    n = Notifier({})
    assert not n.enabled and n.ready("x") is False and n.watchdog() is False


def test_ready_status_reloading_stopping(notify_socket):
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("alpha@1, 0.0 fps")
    assert s.recv(1024) == b"READY=1\nSTATUS=alpha@1, 0.0 fps"
    n.status("busy")
    assert s.recv(1024) == b"STATUS=busy"
    n.reloading()
    lines = s.recv(1024).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=") and int(lines[1][15:]) > 0
    n.stopping()
    assert s.recv(1024) == b"STOPPING=1"
    n.close()


def test_watchdog_at_half_the_period(notify_socket):
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_interval_s == 1.0
    assert [n.watchdog(t) for t in (10.0, 10.5, 10.99, 11.0, 11.2, 12.1)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    assert [s.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3


def test_watchdog_for_another_pid_is_ignored(notify_socket):
    path, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval_s == 0 and n.watchdog(1.0) is False


def test_abstract_namespace():
    name = f"polymorphd-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
    assert s.recv(64) == b"READY=1"
    s.close()


def test_send_failure_is_logged_not_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.ready() is False
    assert "sd_notify" in caplog.text
