"""Label stream: payload schema, seq, topics, JSON and msgpack, bind and connect, CURVE."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

from polymorphd.daemon.config import Curve
from polymorphd.daemon.publish import Publisher, decode, encode, label_payload
from polymorphd.models.core.errors import ConfigError
from tests.daemon.fakes import Sub

CLASSES = ["a", "b", "c", "d"]


def body(**kw):
    args = dict(
        camera="cam0",
        frame_ts=123,
        bundle="x@1",
        classes=CLASSES,
        probs=np.array([0.1, 0.9, 0.6, 0.2], np.float32),
        labels=np.array([2, 1]),
        exit=np.int64(1),
        adapters=[np.int32(3)],
        latency_ms={"capture": np.float32(1.25)},
        energy_mj=None,
        energy_source="none",
        dropped=2,
    )
    args.update(kw)
    return label_payload(**args)


def test_label_payload_schema():
    b = body(include_scores=True, truth=(1, 2))
    assert b["labels"] == [{"id": 1, "name": "b", "score": 0.9}, {"id": 2, "name": "c", "score": 0.6}]
    assert b["exit"] == 1 and type(b["exit"]) is int and b["adapters"] == [3] and b["dropped"] == 2
    assert b["scores"] == [0.1, 0.9, 0.6, 0.2] and b["truth"] == [1, 2] and b["v"] == 1
    assert b["energy_mj"] is None and b["latency_ms"] == {"capture": 1.25}
    assert "scores" not in body() and "truth" not in body()
    assert body(exit="final")["exit"] == "final"
    assert decode(encode(b, "json")) == b == decode(encode(b, "msgpack"))


def test_nan_scores_are_refused_not_published_as_invalid_json():
    with pytest.raises(ValueError):
        encode(body(probs=np.array([np.nan, 1, 1, 1]), include_scores=True), "json")


def wait_connected(pub: Publisher, sub: Sub) -> None:
    """Slow joiner: publish status until the subscriber sees one."""
    for _ in range(200):
        pub.publish_status({"state": "probe"})
        if sub.sock.poll(10):
            sub.recv()
            return
    raise AssertionError("subscriber never connected")


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_publisher_topics_seq_and_format(tmp_path, fmt):
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{tmp_path}/p", "gate", fmt)
    sub = Sub(pub.address, "", ctx)
    wait_connected(pub, sub)
    sent = [pub.publish_labels(body(camera="gate")) for _ in range(5)]
    pub.publish_status({"state": "running"})
    got = [sub.recv(2) for _ in range(6)]
    assert [t for t, _ in got] == ["labels/gate"] * 5 + ["status/gate"]
    assert [p["seq"] for _, p in got[:5]] == [0, 1, 2, 3, 4] == [s["seq"] for s in sent]
    assert all(p["pub_ts"] >= 123 for _, p in got[:5])
    assert got[5][1]["state"] == "running" and got[5][1]["v"] == 1 and got[5][1]["camera"] == "gate"
    raw = sub.sock  # the payload really is in the configured format
    pub.publish_labels(body())
    assert raw.poll(2000)
    data = raw.recv_multipart()[1]
    assert (data[:1] == b"{") == (fmt == "json")
    if fmt == "msgpack":
        assert msgpack.unpackb(data)["seq"] == 5
    assert pub.dropped == 0
    sub.close()
    pub.close()
    ctx.term()


def test_publisher_connect_form_reaches_a_bound_subscriber(tmp_path):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"labels/")
    sub.bind(f"ipc://{tmp_path}/front")
    pub = Publisher(ctx, f"connect:ipc://{tmp_path}/front", "cam0")
    deadline = time.monotonic() + 5
    while not sub.poll(10):
        assert time.monotonic() < deadline
        pub.publish_labels(body())
    topic, payload = sub.recv_multipart()
    assert topic == b"labels/cam0" and decode(payload)["camera"] == "cam0"
    sub.close()
    pub.close()
    ctx.term()


def test_a_busy_endpoint_is_a_config_error(tmp_path):
    ctx = zmq.Context()
    a = Publisher(ctx, "tcp://127.0.0.1:*", "c")
    with pytest.raises(ConfigError, match=f"cannot bind {a.address}"):
        Publisher(ctx, a.address, "c")
    a.close()
    ctx.term()


def test_curve_encrypted_stream(tmp_path):
    import zmq.auth

    from polymorphd.daemon.publish import curve_client

    _, secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{tmp_path}/p", "c", curve=Curve(server_secret_file=secret_file))
    good = ctx.socket(zmq.SUB)
    good.linger = 0
    curve_client(good, str(tmp_path / "server.key"))
    good.setsockopt(zmq.SUBSCRIBE, b"")
    good.connect(pub.address)
    plain = Sub(pub.address, "", ctx)
    deadline = time.monotonic() + 5
    while not good.poll(10):
        assert time.monotonic() < deadline
        pub.publish_status({"state": "x"})
    assert decode(good.recv_multipart()[1])["state"] == "x"
    assert not plain.sock.poll(50)  # a client without the server key gets nothing
    with pytest.raises(ConfigError, match="holds no secret key"):
        Publisher(
            ctx, f"ipc://{tmp_path}/q", "c", curve=Curve(server_secret_file=str(tmp_path / "server.key"))
        )
    for s in (good, plain.sock):
        s.close(0)
    pub.close()
    ctx.term()
