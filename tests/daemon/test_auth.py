"""CURVE "ironhouse": with ``curve.clients_dir`` set, only listed client keys get labels or run control commands,
on both endpoints, through the real ``subscribe`` / ``ctl`` client flags; keys come from ``keygen --curve`` and
rotate with ``ctl reload``. docs/RELIABILITY.md, "Authentication".
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import zmq.auth

from polymorphd.daemon.cli import main
from polymorphd.daemon.control import COMMANDS, request
from tests.daemon.fakes import FakeBackend, config, make_bundle, running


def keygen(path: Path, capsys) -> tuple[Path, Path]:
    assert main(["keygen", "--curve", "--out", str(path)]) == 0
    capsys.readouterr()
    return path.with_name(path.name + ".key"), path.with_name(path.name + ".key_secret")


def test_keygen_curve_writes_a_certificate_pair_and_never_overwrites(tmp_path, capsys):
    public, secret = keygen(tmp_path / "keys" / "server", capsys)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert zmq.auth.load_certificate(str(public)) == (pub, None) and len(sec) == 40
    assert main(["keygen", "--curve", "--out", str(tmp_path / "keys" / "server")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keygen", "--out", str(tmp_path / "sign.key")]) == 0  # the default is still Ed25519
    assert (tmp_path / "sign.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


@pytest.fixture
def ironhouse(tmp_path, capsys):
    keys = {name: keygen(tmp_path / "keys" / name, capsys) for name in ("server", "alice", "mallory")}
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(keys["alice"][0], clients)  # only alice is authorised
    curve = {"server_secret_file": str(keys["server"][1]), "clients_dir": str(clients)}
    backend = FakeBackend()
    b2 = make_bundle(tmp_path / "bundles", "alpha", 2)
    with running(config(tmp_path, make_bundle(tmp_path / "bundles", "alpha", 1), curve=curve), backend) as d:
        yield {"d": d, "keys": keys, "clients": clients, "backend": backend, "b2": b2}


def subscribe(d, keys, client: str | None, capsys) -> tuple[int, list[dict]]:
    args = ["subscribe", "--endpoint", d.publisher.address, "--topic", "labels/", "--count", "3"]
    args += ["--timeout", "1.0", "--server-key", str(keys["server"][0])]
    if client:
        args += ["--client-key", str(keys[client][1])]
    rc = main(args)
    return rc, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def ctl(d, keys, client: str | None, *words: str, capsys) -> tuple[int, str]:
    args = [
        "ctl",
        "--endpoint",
        d.control.address,
        "--timeout",
        "0.5",
        "--server-key",
        str(keys["server"][0]),
    ]
    if client:
        args += ["--client-key", str(keys[client][1])]
    rc = main([*args, *words])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_only_listed_clients_get_labels(ironhouse, capsys):
    d, keys = ironhouse["d"], ironhouse["keys"]
    rc, msgs = subscribe(d, keys, "alice", capsys)
    assert rc == 0 and len(msgs) == 3 and all(m["topic"] == "labels/cam0" for m in msgs)
    for who in ("mallory", None):  # an unlisted key, and an ephemeral one
        assert subscribe(d, keys, who, capsys) == (1, [])
    plain = zmq.Context.instance().socket(zmq.SUB)  # no CURVE at all
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(d.publisher.address)
    assert not plain.poll(500)
    plain.close(0)


def test_unlisted_clients_cannot_run_any_control_command(ironhouse, capsys):
    d, keys, backend = ironhouse["d"], ironhouse["keys"], ironhouse["backend"]
    words = {"load": [str(ironhouse["b2"])], "set": ["max_adapters=1"]}
    for cmd in COMMANDS:
        rc, out = ctl(d, keys, "mallory", cmd, *words.get(cmd, []), capsys=capsys)
        assert rc == 1 and "no reply" in out, (cmd, out)
        assert request(d.control.address, {"cmd": cmd}, 0.2) is None  # and without CURVE
    assert d.control.requests == 0 and len(backend.calls) == 1 and d.engine.knobs()["max_adapters"] == 2
    rc, out = ctl(d, keys, "alice", "load", str(ironhouse["b2"]), capsys=capsys)
    assert rc == 0 and json.loads(out)["bundle"] == "alpha@2"


def test_client_keys_rotate_with_reload(ironhouse, capsys):
    d, keys, clients = ironhouse["d"], ironhouse["keys"], ironhouse["clients"]
    shutil.copy(keys["mallory"][0], clients)  # mallory's key is now authorised, alice's revoked
    (clients / keys["alice"][0].name).unlink()
    rc, out = ctl(d, keys, "alice", "reload", capsys=capsys)
    assert rc == 0 and json.loads(out)["curve_clients"] == 1
    assert ctl(d, keys, "mallory", "status", capsys=capsys)[0] == 0
    assert ctl(d, keys, "alice", "status", capsys=capsys)[0] == 1
    assert subscribe(d, keys, "mallory", capsys)[0] == 0
