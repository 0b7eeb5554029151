"""Label stream v 2 (``count``): new subscribers read it, v 1 subscribers keep working, no count stays v 1."""

from __future__ import annotations

import argparse
import io
import json
import threading

import numpy as np
import pytest
import zmq

from polymorphd.daemon.publish import (
    COUNT_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Publisher,
    decode,
    encode,
    label_payload,
)
from polymorphd.daemon.subscribe import cli_subscribe
from tests.helpers import LABEL_FIELDS


def body(**kw):
    args = dict(
        camera="cam0", frame_ts=5, bundle="b@1", classes=["x", "y"], probs=np.array([0.9, 0.1]), labels=[0],
        exit=1, adapters=[], latency_ms={"total": 1.0}, energy_mj=None, energy_source="none", dropped=0,
    )  # fmt: skip
    args.update(kw)
    return label_payload(**args)


def v1_subscriber(payload: bytes) -> dict:
    """What a subscriber written against schema v 1 does: decode, read the v 1 fields, ignore the rest."""
    msg = decode(payload)
    missing = LABEL_FIELDS - {"seq", "pub_ts"} - set(msg)
    assert not missing, f"v 1 fields missing: {missing}"
    return {"labels": [lab["name"] for lab in msg["labels"]], "exit": msg["exit"], "camera": msg["camera"]}


def test_without_a_count_the_message_is_v1_exactly_as_before():
    b = body()
    assert b["v"] == SCHEMA_VERSION == 1 and "count" not in b
    assert b == body(count=None)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_a_count_makes_v2_and_old_subscribers_still_read_it(fmt):
    b = body(count=2.4567)
    assert b["v"] == COUNT_SCHEMA_VERSION == 2 and b["count"] == 2.457
    assert body(count=-0.3)["count"] == 0.0  # a count is never negative
    old = v1_subscriber(encode(b, fmt))
    assert old == v1_subscriber(encode(body(), fmt)) == {"labels": ["x"], "exit": 1, "camera": "cam0"}
    assert {k: v for k, v in b.items() if k not in ("v", "count")} == {
        k: v for k, v in body().items() if k != "v"
    }


def test_polymorphd_subscribe_prints_the_count(tmp_path):
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{tmp_path}/p", "cam0")
    stop = threading.Event()

    def loop():
        while not stop.wait(0.002):
            pub.publish_labels(body(count=3.0))

    t = threading.Thread(target=loop)
    t.start()
    try:
        out = io.StringIO()
        ns = argparse.Namespace(endpoint=pub.address, topic="labels/", summary=None, count=3, timeout=5.0)
        assert cli_subscribe(ns, out) == 0
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [x["count"] for x in lines] == [3.0] * 3 and {x["v"] for x in lines} == {2}
    finally:
        stop.set()
        t.join(5)
        pub.close()
        ctx.term()
