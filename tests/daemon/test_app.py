"""The daemon end to end in-process: label stream, heartbeats, hot swap, rollback, control, notify, signals."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from polymorphd.daemon import app as app_mod
from polymorphd.daemon.control import request
from polymorphd.daemon.power import Meter
from polymorphd.models.core.errors import BundleError
from tests.daemon.fakes import FakeBackend, FlakyOpener, Sub, config, make_bundle, running
from tests.helpers import LABEL_FIELDS


def is_labels(topic: str, p: dict) -> bool:
    return topic.startswith("labels/")


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def ctl(d, req: dict, timeout: float = 5.0) -> dict:
    reply = request(d.control.address, req, timeout)
    assert reply is not None, f"no reply to {req}"
    return reply


@pytest.fixture
def b1(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundles", "alpha", 1)


def test_label_stream_schema_and_consecutive_seq(tmp_path, b1):
    cfg = config(tmp_path, b1, camera="door", include_scores=True)
    with running(cfg, FakeBackend()) as d:
        sub = Sub(d.publisher.address, "labels/door")
        msgs = [sub.recv() for _ in range(20)]
        sub.close()
    seqs = [p["seq"] for _, p in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    topic, p = msgs[-1]
    assert topic == "labels/door"
    assert set(p) >= LABEL_FIELDS and p["v"] == 1 and p["camera"] == "door" and p["bundle"] == "alpha@1"
    assert set(p["latency_ms"]) == {"capture", "preprocess", "inference", "total"}
    assert p["latency_ms"]["total"] >= p["latency_ms"]["capture"] >= 0
    assert p["pub_ts"] >= p["frame_ts"] > 0
    assert p["energy_mj"] is None and p["energy_source"] == "none"
    assert len(p["scores"]) == 6 and p["truth"] == [p["truth"][0]]
    for lab in p["labels"]:  # only classes above the engine's threshold, with names
        assert lab["score"] > 0.5 and p["scores"][lab["id"]] == lab["score"]
        assert lab["name"] == ["person", "car", "dog", "bike", "tree", "sign"][lab["id"]]


def test_heartbeats_and_final_status(tmp_path, b1):
    cfg = config(tmp_path, b1, heartbeat_s=0.1, source_fps=0)
    sub = Sub(f"ipc://{tmp_path}/pub", "status/")
    with running(cfg, FakeBackend(), FlakyOpener(fail_opens=10**6)) as d:  # no frames at all: status only
        got = [sub.recv(2.0) for _ in range(3)]
        assert all(t == "status/cam0" and p["state"] == "running" for t, p in got)
        assert got[-1][1]["source"]["state"] == "reconnecting"
        assert d.status()["bundle"] == "alpha@1"
    final = sub.until(lambda t, p: p["state"] == "stopped", 3.0)
    assert final[-1][1]["frames"] == 0
    sub.close()


def test_hot_swap_while_streaming_has_no_seq_gap(tmp_path, b1):
    b2 = make_bundle(tmp_path / "bundles", "alpha", 2)
    backend = FakeBackend(load_delay_s=0.05)
    with running(config(tmp_path, b1), backend) as d:
        sub = Sub(d.publisher.address, "labels/")
        sub.recv()
        reply = {}
        t = threading.Thread(target=lambda: reply.update(ctl(d, {"cmd": "load", "path": str(b2)})))
        t.start()
        msgs = sub.until(lambda t_, p: p["bundle"] == "alpha@2")
        msgs += [sub.recv() for _ in range(5)]
        t.join(5)
        sub.close()
        assert reply == {"ok": True, "bundle": "alpha@2", "previous": "alpha@1"}
        assert d.status()["previous"] == "alpha@1" and d.frame_errors == 0
    seqs = [p["seq"] for _, p in msgs]
    assert all(b - a == 1 for a, b in itertools.pairwise(seqs)), seqs
    bundles = [p["bundle"] for _, p in msgs]
    assert bundles == sorted(bundles)  # one switch, never back
    assert backend.calls[-1]["path"] == str(b2) and backend.calls[-1]["mode"] == "polymorph"


def test_failed_load_is_refused_and_stream_continues(tmp_path, b1):
    bad = make_bundle(tmp_path / "bundles", "broken", 3, corrupt=True)
    with running(config(tmp_path, b1), FakeBackend()) as d:
        sub = Sub(d.publisher.address, "labels/")
        sub.recv()
        reply = ctl(d, {"cmd": "load", "path": str(bad)})
        assert reply["ok"] is False and "fake.json" in reply["error"] and str(bad) in reply["error"]
        missing = ctl(d, {"cmd": "load", "path": str(tmp_path / "nope")})
        assert missing["ok"] is False and "nope" in missing["error"]
        after = [sub.recv() for _ in range(5)]
        sub.close()
        assert {p["bundle"] for _, p in after} == {"alpha@1"}
        assert d.previous is None


def test_rollback_and_adapter_bundles(tmp_path, b1):
    b2 = make_bundle(tmp_path / "bundles", "alpha", 2)
    ad = make_bundle(tmp_path / "bundles", "ctx", 7, adapter=True)
    foreign = make_bundle(tmp_path / "bundles", "ctx", 8, adapter=True, base="other")
    backend = FakeBackend()
    with running(config(tmp_path, b1), backend) as d:
        r = ctl(d, {"cmd": "rollback"})
        assert r["ok"] is False and "no previous bundle" in r["error"]
        assert ctl(d, {"cmd": "load", "path": str(b2)})["ok"]
        first = backend.engines[0]
        r = ctl(d, {"cmd": "rollback"})
        assert r == {"ok": True, "bundle": "alpha@1", "previous": "alpha@2"}
        assert d.engine is first and not first.closed
        assert ctl(d, {"cmd": "rollback"})["bundle"] == "alpha@2"
        r = ctl(d, {"cmd": "load", "path": str(ad)})
        assert r["ok"] and r["bundle"] == "ctx@7" and r["previous"] == "alpha@2"
        assert first.closed  # retired: two swaps back
        r = ctl(d, {"cmd": "load", "path": str(foreign)})
        assert r["ok"] is False and "base other" in r["error"]
        assert d.engine.bundle_id == "ctx@7"


def test_set_knobs_survive_a_swap_and_bad_knobs_are_refused(tmp_path, b1):
    b2 = make_bundle(tmp_path / "bundles", "alpha", 2)
    with running(config(tmp_path, b1, policy={"max_adapters": 3}), FakeBackend()) as d:
        assert d.engine.knobs()["max_adapters"] == 3
        r = ctl(d, {"cmd": "set", "threshold": 0.9})
        assert r["ok"] and r["knobs"]["threshold"] == 0.9
        r = ctl(d, {"cmd": "set", "warp": 9})
        assert r["ok"] is False and "unknown knob 'warp'" in r["error"]
        assert ctl(d, {"cmd": "load", "path": str(b2)})["ok"]
        assert d.engine.knobs()["threshold"] == 0.9 and d.engine.knobs()["max_adapters"] == 3


def test_malformed_control_requests_get_ok_false(tmp_path, b1):
    import zmq

    with running(config(tmp_path, b1), FakeBackend()) as d:
        s = zmq.Context.instance().socket(zmq.REQ)
        s.linger = 0
        s.connect(d.control.address)
        for raw in (b"{nope", b"[1, 2]", b'{"cmd": "explode"}', b'{"cmd": "load"}', b"\xff\xfe"):
            s.send(raw)
            assert s.poll(5000)
            reply = json.loads(s.recv())
            assert reply["ok"] is False and reply["error"], raw
        s.close()
        st = ctl(d, {"cmd": "stats"})
        assert st["ok"] and st["state"] == "running" and st["frames"] > 0 and st["control_requests"] >= 5
        assert set(st["latency_ms"]) == {"capture", "preprocess", "inference", "total"}


def test_bad_frames_are_counted_and_the_loop_survives(tmp_path, b1):
    opener = FlakyOpener(bad={3, 4, 10})  # reads 3, 4 and 10 give frames the engine rejects
    with running(config(tmp_path, b1, drop_policy="block"), FakeBackend(), opener) as d:
        sub = Sub(d.publisher.address, "labels/")
        msgs = sub.until(lambda t, p: p["seq"] >= 12)
        sub.close()
        assert d.frame_errors == 3
        assert d.status()["dropped"] == 3  # failed frames count as dropped in the next message
    by_seq = {p["seq"]: p["dropped"] for _, p in msgs}
    assert by_seq.get(8, 1) == 1 and by_seq[12] == 0  # read 11 -> seq 8 follows the failed read 10


def test_source_that_dies_comes_back(tmp_path, b1):
    opener = FlakyOpener(dead=set(range(5, 9)))
    with running(config(tmp_path, b1), FakeBackend(), opener) as d:
        sub = Sub(d.publisher.address, "labels/")
        msgs = sub.until(lambda t, p: p["seq"] >= 12)
        sub.close()
        assert d.source.stats()["reconnects"] == 4 and opener.opens == 5
        assert d.status()["source"]["state"] == "live"
    assert msgs[-1][1]["bundle"] == "alpha@1"


def test_sd_notify_ready_watchdog_stopping(tmp_path, b1):
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    with running(config(tmp_path, b1), FakeBackend(), env=env):
        got = [srv.recv(4096).decode()]
        while not any("WATCHDOG=1" in m for m in got):
            got.append(srv.recv(4096).decode())
        assert got[0].startswith("READY=1\nSTATUS=alpha@1")
    rest = []
    while "STOPPING=1" not in rest:
        rest.append(srv.recv(4096).decode())
    srv.close()


def test_reload_reads_the_config_file(tmp_path, b1):
    b2 = make_bundle(tmp_path / "bundles", "alpha", 2)
    cfg_file = tmp_path / "polymorphd.yaml"
    base = {
        "bundle": str(b1),
        "pub": f"ipc://{tmp_path}/pub",
        "ctl": f"ipc://{tmp_path}/ctl",
        "warmup_runs": 0,
        "policy": {"max_adapters": 1},
    }
    cfg_file.write_text(yaml.safe_dump(base))
    cfg = app_mod.load_config(cfg_file)
    backend = FakeBackend()
    with running(cfg, backend, config_path=str(cfg_file)) as d:
        cfg_file.write_text(yaml.safe_dump({**base, "policy": {"max_adapters": 4}, "camera": "x"}))
        r = ctl(d, {"cmd": "reload"})
        assert r["ok"] and r["knobs"]["max_adapters"] == 4 and r["restart_required"] == ["camera"]
        assert d.engine.bundle_id == "alpha@1"
        cfg_file.write_text("heartbeat_s: 9\n")
        r = ctl(d, {"cmd": "reload"})
        assert r["ok"] is False and "heartbeat_s" in r["error"]
        cfg_file.write_text(yaml.safe_dump({**base, "bundle": str(b2)}))
        d.request_reload()  # the SIGHUP path: the loop hands it to a worker thread
        sub = Sub(d.publisher.address, "labels/")
        sub.until(lambda t, p: p["bundle"] == "alpha@2")
        sub.close()
        wait_for(lambda: d.cfg.bundle == str(b2))  # the worker records the new config right after the swap


def test_msgpack_payloads(tmp_path, b1):
    with running(config(tmp_path, b1, payload_format="msgpack"), FakeBackend()) as d:
        sub = Sub(d.publisher.address, "labels/")
        raw_topic, p = sub.recv()
        sub.close()
    assert raw_topic == "labels/cam0" and p["v"] == 1 and isinstance(p["labels"], list)


def test_failed_start_cleans_up(tmp_path, b1):
    bad = make_bundle(tmp_path / "bundles", "broken", 1, corrupt=True)
    d = app_mod.Daemon(config(tmp_path, bad), engine_factory=FakeBackend().load, meter=Meter())
    with pytest.raises(BundleError, match=r"fake\.json"):
        d.start()
    assert d.state == "stopped"
    d.stop()  # idempotent


def test_cli_serve_stops_on_sigterm(tmp_path, b1, monkeypatch, capsys):
    backend = FakeBackend()
    monkeypatch.setattr(app_mod, "_default_factory", backend.load)
    monkeypatch.setattr(app_mod, "probe_meter", lambda: Meter())
    monkeypatch.setattr(app_mod, "FrameSource", _fake_source_class(FlakyOpener()))
    sub = Sub(f"ipc://{tmp_path}/pub", "")
    args = _serve_args(tmp_path, b1)

    def watcher():
        try:
            sub.until(lambda t, p: t.startswith("labels/") and p["seq"] >= 3, 10)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=watcher)
    t.start()
    assert app_mod.cli_serve(args) == 0
    t.join(5)
    final = sub.until(lambda t_, p: t_.startswith("status/") and p["state"] == "stopped", 3)
    assert final[-1][1]["frames"] >= 3
    sub.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_validate_config_prints_ok(tmp_path, b1, capsys):
    args = _serve_args(tmp_path, b1, validate_config=True)
    assert app_mod.cli_serve(args) == 0
    assert capsys.readouterr().out.startswith("config OK: camera=cam0")


def test_daemon_modules_import_without_torch():
    mods = [
        "app",
        "config",
        "sources",
        "publish",
        "control",
        "power",
        "systemd",
        "metrics",
        "subscribe",
        "proxy",
    ]
    code = "import sys; sys.modules['torch'] = None\n" + "".join(
        f"import polymorphd.daemon.{m}\n" for m in mods
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _serve_args(tmp_path, bundle, **kw):
    import argparse

    ns = dict(
        config=None,
        bundle=str(bundle),
        source="synthetic:",
        pub=f"ipc://{tmp_path}/pub",
        ctl=f"ipc://{tmp_path}/ctl",
        camera=None,
        mode=None,
        fps=100.0,
        validate_config=False,
        verbose=1,
    )
    ns.update(kw)
    return argparse.Namespace(**ns)


def _fake_source_class(opener):
    from polymorphd.daemon.sources import FrameSource

    class Src(FrameSource):
        @classmethod
        def from_config(cls, cfg, opener_=None):
            return FrameSource(cfg.source, fps=cfg.source_fps, opener=opener)

    return Src


class _CountingMeter(Meter):
    """1 W, as a fake hwmon meter; fails after `fail_after` samples when set."""

    source = "hwmon"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.samples, self.fail_after = 0, fail_after

    def sample(self) -> None:
        self.samples += 1
        if self.fail_after is not None and self.samples > self.fail_after:
            raise OSError("in1_input: No such device")
        t = self._clock()
        self._cum.append(0.0 if not self._t else self._cum[-1] + (t - self._t[-1]) / 1e6)  # 1 W = 1 mJ/ms
        self._t.append(t)


def test_energy_per_frame_and_a_failing_meter_costs_only_the_energy(tmp_path, b1):
    with running(config(tmp_path, b1), FakeBackend(delay_s=0.002), meter=_CountingMeter()) as d:
        sub = Sub(d.publisher.address, "labels/")
        _, p = sub.recv()
        sub.close()
        assert p["energy_source"] == "hwmon" and p["energy_mj"] > 0
        wait_for(lambda: d.stats()["energy_mj_mean"] is not None)  # bookkeeping follows the publish
        assert d.stats()["energy_mj_mean"] > 0
    with running(config(tmp_path, b1), FakeBackend(), meter=_CountingMeter(fail_after=3)) as d:
        sub = Sub(d.publisher.address, "labels/")
        msgs = sub.until(lambda t, p: p["energy_source"] == "none" and p["seq"] >= 5)
        sub.close()
        assert d.frame_errors == 0 and msgs[-1][1]["energy_mj"] is None


def test_curve_protects_both_sockets(tmp_path, b1):
    import zmq.auth

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(keys), "client")
    os.replace(client_public, clients / "client.key")
    curve = {"server_secret_file": server_secret, "clients_dir": str(clients)}
    with running(config(tmp_path, b1, curve=curve), FakeBackend()) as d:
        server_public = str(keys / "server.key")
        r = request(
            d.control.address, {"cmd": "status"}, 5, server_key=server_public, client_key=client_secret
        )
        assert r is not None and r["ok"] and r["bundle"] == "alpha@1"
        # a client key that is not in clients_dir, and a plain client, get no answer
        assert request(d.control.address, {"cmd": "status"}, 0.3, server_key=server_public) is None
        assert request(d.control.address, {"cmd": "status"}, 0.3) is None


def test_reload_follows_a_moved_current_symlink(tmp_path, b1):
    b2 = make_bundle(tmp_path / "bundles", "alpha", 2)
    current = tmp_path / "bundles" / "current"
    current.symlink_to(b1)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "bundle": str(current),
                "pub": f"ipc://{tmp_path}/pub",
                "ctl": f"ipc://{tmp_path}/ctl",
                "warmup_runs": 0,
            }
        )
    )
    with running(app_mod.load_config(cfg_file), FakeBackend(), config_path=str(cfg_file)) as d:
        r = ctl(d, {"cmd": "reload"})
        assert r["ok"] and "reloaded_bundle" not in r and d.engine.bundle_id == "alpha@1"
        tmp = tmp_path / "bundles" / "next"
        tmp.symlink_to(b2)
        os.replace(tmp, current)  # what polymorphd-install-bundle does
        r = ctl(d, {"cmd": "reload"})
        assert r["ok"] and r["reloaded_bundle"] and r["bundle"] == "alpha@2"
        assert ctl(d, {"cmd": "reload"}).get("reloaded_bundle") is None  # nothing moved since
