"""polymorphd subscribe: JSON lines, msgpack decoding, --count, --timeout, --summary."""

from __future__ import annotations

import argparse
import io
import json
import threading

import numpy as np
import pytest
import zmq

from polymorphd.daemon.publish import Publisher, label_payload
from polymorphd.daemon.subscribe import StreamSummary, cli_subscribe


def body(seq_hint: int = 0):
    return label_payload(
        camera="cam0",
        frame_ts=1,
        bundle="b@1",
        classes=["x", "y"],
        probs=np.array([0.9, 0.1]),
        labels=[0],
        exit="final",
        adapters=[],
        latency_ms={"total": 1.0},
        energy_mj=None,
        energy_source="none",
        dropped=0,
    )


@pytest.fixture(params=["json", "msgpack"])
def publishing(request, tmp_path):
    """A publisher sending labels (and status) until the test ends, so late joiners still get messages."""
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{tmp_path}/p", "cam0", request.param)
    stop = threading.Event()

    def loop():
        while not stop.wait(0.002):
            pub.publish_labels(body())
            if pub.seq % 10 == 0:
                pub.publish_status({"state": "running"})

    t = threading.Thread(target=loop)
    t.start()
    yield pub
    stop.set()
    t.join(5)
    pub.close()
    ctx.term()


def args(endpoint, **kw):
    base = dict(endpoint=endpoint, topic="", summary=None, count=None, timeout=5.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_prints_json_lines_with_topic(publishing, capsys):
    out = io.StringIO()
    assert cli_subscribe(args(publishing.address, topic="labels/", count=5), out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 5 and all(x["topic"] == "labels/cam0" for x in lines)
    assert lines[0]["labels"] == [{"id": 0, "name": "x", "score": 0.9}] and lines[0]["v"] == 1
    seqs = [x["seq"] for x in lines]
    assert seqs == list(range(seqs[0], seqs[0] + 5))


def test_summary_goes_to_stderr(publishing, capsys):
    out = io.StringIO()
    assert cli_subscribe(args(publishing.address, count=30, summary=0.01), out) == 0
    err = capsys.readouterr().err
    assert "summary: " in err and "top labels: x:" in err and "missing by seq" in err


def test_timeout_exits_1(tmp_path, capsys):
    assert cli_subscribe(args(f"ipc://{tmp_path}/silent", timeout=0.05), io.StringIO()) == 1
    assert "no message on" in capsys.readouterr().err


def test_stream_summary_counts_gaps_per_camera():
    s = StreamSummary()
    for cam, seq in [("a", 0), ("a", 1), ("b", 7), ("a", 4), ("b", 8), ("a", 5)]:
        s.add(f"labels/{cam}", {"camera": cam, "seq": seq, "labels": [{"id": 1, "name": "dog"}]})
    s.add("status/a", {"state": "running"})
    assert s.gaps == 2 and s.labels_messages == 6 and s.messages == 7
    assert s.label_counts["dog"] == 6 and "2 missing by seq" in s.line()
