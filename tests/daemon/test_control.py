"""Control channel: request validation, never-crash replies, and the ctl client."""

from __future__ import annotations

import argparse
import json

import pytest
import zmq

from polymorphd.daemon.control import ControlServer, RequestError, cli_ctl, parse_request, request
from polymorphd.models.core.errors import BundleError, ConfigError


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"\xff", "not UTF-8 JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "unknown cmd None"),
        (b'{"cmd": "reboot"}', "unknown cmd 'reboot'; expected one of status, stats, load"),
        (b'{"cmd": "load"}', 'load needs "path"'),
        (b'{"cmd": "load", "path": ""}', 'load needs "path"'),
        (b'{"cmd": "load", "path": "/b", "force": 1}', "load takes no argument(s) ['force']"),
        (b'{"cmd": "status", "x": 1}', "status takes no argument(s) ['x']"),
        (b'{"cmd": "set"}', "set needs at least one knob"),
    ],
)
def test_bad_requests(raw, words):
    with pytest.raises(RequestError, match=None) as err:
        parse_request(raw)
    assert words in str(err.value)


def test_good_requests():
    assert parse_request(b'{"cmd": "status"}') == {"cmd": "status"}
    assert parse_request(b'{"cmd": "set", "max_adapters": 1}')["max_adapters"] == 1


def handlers(calls):
    def boom(req):
        raise RuntimeError("handler bug")

    def load(req):
        if req["path"] == "/bad":
            raise BundleError("/bad/manifest.json: hash mismatch")
        calls.append(req)
        return {"bundle": "b@2"}

    return {
        "status": lambda r: {"state": "running"},
        "stats": boom,
        "load": load,
        "rollback": lambda r: {"ok": False, "error": "nothing to roll back"},
        "reload": lambda r: {},
        "set": lambda r: {"knobs": {k: v for k, v in r.items() if k != "cmd"}},
    }


@pytest.fixture
def server(tmp_path):
    ctx = zmq.Context()
    calls: list = []
    srv = ControlServer(ctx, f"ipc://{tmp_path}/ctl", handlers(calls), poll_ms=20)
    srv.start()
    srv.calls = calls
    yield srv
    assert srv.stop(2.0)
    ctx.term()


def test_server_replies_and_survives_errors(server):
    ep = server.address
    assert request(ep, {"cmd": "status"}, 2) == {"ok": True, "state": "running"}
    r = request(ep, {"cmd": "stats"}, 2)
    assert r == {"ok": False, "error": "internal error: RuntimeError: handler bug"}
    r = request(ep, {"cmd": "load", "path": "/bad"}, 2)
    assert r == {"ok": False, "error": "/bad/manifest.json: hash mismatch"}
    assert request(ep, {"cmd": "rollback"}, 2) == {"ok": False, "error": "nothing to roll back"}
    assert request(ep, {"cmd": "load", "path": "/good"}, 2) == {"ok": True, "bundle": "b@2"}
    assert request(ep, {"cmd": "nope"}, 2)["ok"] is False
    assert server.requests == 6 and server.errors == 3
    assert server.calls == [{"cmd": "load", "path": "/good"}]


def ctl_args(ep, cmd, *words, timeout=2.0):
    return argparse.Namespace(endpoint=ep, cmd=cmd, args=list(words), timeout=timeout)


def test_cli_ctl(server, capsys, tmp_path):
    assert cli_ctl(ctl_args(server.address, "status")) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "state": "running"}
    assert cli_ctl(ctl_args(server.address, "set", "max_adapters=1", "mode=full", "lo=[0.1,0.2]")) == 0
    assert json.loads(capsys.readouterr().out)["knobs"] == {
        "max_adapters": 1,
        "mode": "full",
        "lo": [0.1, 0.2],
    }
    assert cli_ctl(ctl_args(server.address, "load", "/bad")) == 1
    captured = capsys.readouterr()
    assert (
        json.loads(captured.out)["ok"] is False and "error: /bad/manifest.json: hash mismatch" in captured.err
    )
    (tmp_path / "b2").mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # a local relative path is sent absolute: the daemon has its own working directory
        assert cli_ctl(ctl_args(server.address, "load", "b2")) == 0
    finally:
        os.chdir(cwd)
    assert server.calls[-1]["path"] == str(tmp_path / "b2")


def test_cli_ctl_usage_errors_and_timeout(tmp_path, capsys):
    with pytest.raises(ConfigError, match="exactly one PATH"):
        cli_ctl(ctl_args("ipc://x", "load"))
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        cli_ctl(ctl_args("ipc://x", "set", "oops"))
    with pytest.raises(ConfigError, match="takes no arguments"):
        cli_ctl(ctl_args("ipc://x", "status", "extra"))
    assert cli_ctl(ctl_args(f"ipc://{tmp_path}/nobody", "status", timeout=0.1)) == 1
    assert "no reply from" in capsys.readouterr().err
