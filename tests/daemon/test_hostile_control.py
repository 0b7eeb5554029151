"""Hostile control input, fuzzed with hypothesis: random bytes, deep JSON, wrong types, unknown commands, huge
messages and load paths outside the bundle store or through symlinks. Every request gets ``ok: false`` with an
error (or, over the size cap, a closed connection that is logged), the daemon never stops serving, and nothing
outside the store is read as a bundle or changed. docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polymorphd.daemon.app import Daemon
from polymorphd.daemon.control import COMMANDS, MAX_REQUEST_BYTES
from tests.daemon.fakes import FakeBackend, FlakyOpener, config, make_bundle, running

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class Recording(FakeBackend):
    """A backend that remembers every path anything tried to read as a bundle."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[str] = []

    def load(self, path: str, **kwargs):
        self.read.append(path)
        return super().load(path, **kwargs)

    def is_adapter(self, path: str) -> bool:
        self.read.append(path)
        return super().is_adapter(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """A daemon whose bundle store holds alpha v1 and v2, symlinks that lead out of it, and an outside bundle."""
    root = tmp_path_factory.mktemp("hostile")
    store, outside = root / "store", root / "outside"
    b1, b2 = make_bundle(store, "alpha", 1), make_bundle(store, "alpha", 2)
    evil = make_bundle(outside, "evil", 9)  # a loadable bundle: only the path check keeps it out
    (store / "link-out").symlink_to(evil)
    (store / "link-up").symlink_to("..")
    (store / "current").symlink_to(b1.name)
    backend = Recording()
    cfg = config(root, store / "current", bundle_store=str(store))
    with running(cfg, backend, FlakyOpener()) as d:
        yield {"d": d, "backend": backend, "store": store, "outside": outside, "evil": evil, "b2": b2}


def ask(d: Daemon, req: bytes | dict, timeout: float = 5.0) -> dict | None:
    """Send raw bytes (or a dict as JSON) over the real control socket."""
    import zmq

    from polymorphd.daemon.config import client_address

    raw = req if isinstance(req, bytes) else json.dumps(req).encode()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(client_address(d.control.address))
        sock.send(raw)
        return json.loads(sock.recv()) if sock.poll(int(timeout * 1000)) else None
    finally:
        sock.close(0)


def refused(reply: dict | None) -> str:
    assert isinstance(reply, dict) and reply["ok"] is False, reply
    assert isinstance(reply["error"], str) and reply["error"], reply
    return reply["error"]


def still_serving(w: dict) -> None:
    d = w["d"]
    assert d.state == "running" and d.engine.bundle_id in ("alpha@1", "alpha@2")
    outside = [p for p in w["backend"].read if Path(os.path.realpath(p)).is_relative_to(w["outside"])]
    assert not outside, f"read as a bundle outside the store: {outside}"


@FUZZ
@given(raw=st.binary(max_size=4096))
def test_random_bytes(world, raw):
    try:
        json.loads(raw)
        return  # the rare valid JSON document is the wrong-types test's business
    except ValueError:
        pass
    assert "not UTF-8 JSON" in refused(world["d"].control.handle(raw))
    still_serving(world)


@FUZZ
@given(depth=st.integers(1, MAX_REQUEST_BYTES // 2 - 1), opener=st.sampled_from("[{"))
def test_deep_json(world, depth, opener):
    doc = ("[" * depth + "]" * depth) if opener == "[" else ('{"a":' * depth + "1" + "}" * depth)
    error = refused(world["d"].control.handle(doc.encode()))
    assert "nested too deeply" in error or "must be a JSON object" in error or "unknown cmd" in error
    still_serving(world)


@FUZZ
@given(
    req=st.dictionaries(st.text(max_size=10), JSON, max_size=5)
    | st.fixed_dictionaries({"cmd": JSON | st.sampled_from(COMMANDS)}, optional={"path": JSON, "x": JSON})
    | JSON
)
def test_wrong_types_and_unknown_commands(world, req):
    reply = ask(world["d"], req)
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    if reply["ok"]:  # only a well-formed request that the daemon may serve gets ok: true
        assert isinstance(req, dict) and req.get("cmd") in ("status", "stats", "reload", "rollback"), req
        assert set(req) == {"cmd"}
    else:
        refused(reply)
    still_serving(world)


HOSTILE_PATHS = [
    "/etc/passwd",
    "/",
    "",
    ".",
    "..",
    "{outside}",
    "{evil}",
    "{store}",
    "{store}/../outside/evil-v9",
    "{store}/link-out",
    "{store}/link-up/outside/evil-v9",
    "{store}/alpha-v1/../../outside/evil-v9",
    "{store}/missing",
    "{store}\x00/alpha-v2",
    "relative/evil-v9",
]


@FUZZ
@given(
    path=st.sampled_from(HOSTILE_PATHS) | st.text(max_size=40),
    suffix=st.sampled_from(["", "/", "/fake.json"]),
)
def test_load_paths_outside_the_store_or_through_symlinks(world, path, suffix):
    for key in ("store", "outside", "evil"):
        path = path.replace(f"{{{key}}}", str(world[key]))
    p = path + suffix
    before = sorted((str(f), f.read_bytes()) for f in world["outside"].rglob("*") if f.is_file())
    reply = ask(world["d"], {"cmd": "load", "path": p})
    error = refused(reply)
    real = os.path.realpath(p) if "\x00" not in p else p
    if not Path(real).is_relative_to(world["store"].resolve()) or real == str(world["store"].resolve()):
        assert "outside the bundle store" in error or "NUL byte" in error or "needs" in error, error
    still_serving(world)
    assert sorted((str(f), f.read_bytes()) for f in world["outside"].rglob("*") if f.is_file()) == before


def test_a_good_path_inside_the_store_still_loads(world):
    reply = ask(world["d"], {"cmd": "load", "path": str(world["b2"])})
    assert reply is not None and reply["ok"] and reply["bundle"] == "alpha@2", reply
    assert ask(world["d"], {"cmd": "rollback"})["ok"]


def test_a_huge_message_is_dropped_by_zeromq_and_logged(world, caplog):
    d = world["d"]
    with caplog.at_level(logging.WARNING, logger="polymorphd.daemon.control"):
        assert ask(d, b'{"cmd": "status", "pad": "' + b"x" * (4 * MAX_REQUEST_BYTES) + b'"}', 1.0) is None
        assert ask(d, {"cmd": "status"})["ok"]  # the next client is served as usual
    assert d.control.dropped_connections >= 1
    assert any("MAXMSGSIZE" in r.getMessage() for r in caplog.records), caplog.text
    still_serving(world)
