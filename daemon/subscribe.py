"""``polymorphd subscribe``: print the label stream as JSON lines, optionally with a running summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, TextIO

import msgpack
import zmq

from polymorphd.daemon.config import client_address
from polymorphd.daemon.publish import curve_client, decode
from polymorphd.models.core.errors import ConfigError


class StreamSummary:
    """Running fps, seq gaps and label counts per camera (what an operator checks first)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.messages = self.labels_messages = self.gaps = 0
        self._last_seq: dict[str, int] = {}
        self.label_counts: Counter[str] = Counter()

    def add(self, topic: str, payload: dict[str, Any]) -> None:
        self.messages += 1
        if not topic.startswith("labels/"):
            return
        self.labels_messages += 1
        cam, seq = str(payload.get("camera", topic)), payload.get("seq")
        if isinstance(seq, int):
            last = self._last_seq.get(cam)
            if last is not None and seq > last + 1:
                self.gaps += seq - last - 1
            self._last_seq[cam] = seq
        for lab in payload.get("labels", []):
            self.label_counts[str(lab.get("name", lab.get("id")))] += 1

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        top = ", ".join(f"{n}:{c}" for n, c in self.label_counts.most_common(8)) or "-"
        return (
            f"summary: {self.labels_messages} label msgs ({self.labels_messages / dt:.1f}/s), "
            f"{self.messages - self.labels_messages} status, {self.gaps} missing by seq; top labels: {top}"
        )


def _open(args: argparse.Namespace, ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    server_key = getattr(args, "server_key", None)
    if server_key:
        curve_client(sock, server_key, getattr(args, "client_key", None))
    try:
        sock.connect(client_address(args.endpoint))
    except (ValueError, zmq.ZMQError) as exc:
        sock.close(0)
        raise ConfigError(f"--endpoint {args.endpoint!r}: {exc}") from exc
    sock.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
    return sock


def cli_subscribe(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print ``{"topic": ..., **payload}`` per message; exit 1 when --timeout passes with nothing."""
    out = out or sys.stdout
    ctx = zmq.Context()
    sock = _open(args, ctx)
    summary = StreamSummary()
    next_summary = time.monotonic() + args.summary if args.summary else float("inf")
    received = 0
    last_msg = time.monotonic()
    try:
        while args.count is None or received < args.count:
            now = time.monotonic()
            wait_s = min(0.5, next_summary - now)
            if args.timeout is not None:
                wait_s = min(wait_s, last_msg + args.timeout - now)
            if sock.poll(max(0, int(wait_s * 1000)), zmq.POLLIN):
                frames = sock.recv_multipart()
                last_msg = time.monotonic()
                topic = frames[0].decode("utf-8", "replace")
                if len(frames) != 2:
                    print(f"warning: {topic}: expected 2 frames, got {len(frames)}", file=sys.stderr)
                    continue
                try:
                    payload = decode(frames[1])
                except (ValueError, TypeError, msgpack.UnpackException) as exc:
                    print(f"warning: undecodable message on {topic}: {exc}", file=sys.stderr)
                    continue
                out.write(json.dumps({"topic": topic, **payload}) + "\n")
                out.flush()
                summary.add(topic, payload)
                received += 1
            elif args.timeout is not None and time.monotonic() - last_msg >= args.timeout:
                print(
                    f"error: no message on {args.endpoint} (topic {args.topic!r}) for {args.timeout:g} s",
                    file=sys.stderr,
                )
                return 1
            if time.monotonic() >= next_summary:
                print(summary.line(), file=sys.stderr)
                next_summary = time.monotonic() + args.summary
    except BrokenPipeError:  # `| head` closed the pipe: a normal way to stop
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if args.summary:
            print(summary.line(), file=sys.stderr)
        sock.close(0)
        ctx.term()
    return 0
