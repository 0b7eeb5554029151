"""Load, as behaviour (bench/load.py measures rates and latency): stalled subscribers never block the frame loop;
they lose messages at ZeroMQ's high-water mark while a reading subscriber gets every seq."""

from __future__ import annotations

import zmq

from tests.daemon.fakes import FakeBackend, FlakyOpener, Sub, config, make_bundle, running

FRAMES = 3000  # beyond what a stalled subscriber can hold (SNDHWM + RCVHWM = 2000 messages by default)


def test_stalled_subscribers_never_block_the_frame_loop(tmp_path):
    opener = FlakyOpener(stall={0}, length=FRAMES)  # read 0 waits until every subscriber has joined
    cfg = config(tmp_path, make_bundle(tmp_path, "alpha"), source_fps=0, drop_policy="block")
    with running(cfg, FakeBackend(), opener) as d:
        ctx = zmq.Context()
        stalled = [Sub(d.publisher.address, "labels/", ctx) for _ in range(10)]
        meas = Sub(d.publisher.address, "", ctx)
        meas.sock.rcvhwm = 0
        meas.until(lambda t, p: t.startswith("status/"))
        for s in stalled:  # joined (a status message reaches them too once they are connected)
            s.sock.setsockopt(zmq.SUBSCRIBE, b"status/")
            s.until(lambda t, p: t.startswith("status/"))
        opener.stalled.set()
        msgs = meas.until(lambda t, p: t.startswith("labels/") and p["seq"] == FRAMES - 1, 60, 10 * FRAMES)
        got = [p["seq"] for t, p in msgs if t.startswith("labels/")]
        published = d.publisher.seq
        held = 0
        while stalled[0].sock.poll(100):  # what the stalled one could hold: less than everything
            topic, _ = stalled[0].sock.recv_multipart()
            held += topic.startswith(b"labels/")
        for s in [*stalled, meas]:
            s.close()
        ctx.term()
    assert got == list(range(FRAMES)) and published == FRAMES
    assert 0 < held < FRAMES
