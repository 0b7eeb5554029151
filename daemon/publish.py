"""The label stream: ZeroMQ PUB, two-frame ``[topic, payload]`` messages (DESIGN.md "Label stream").

Topics ``labels/<camera>`` and ``status/<camera>``; payloads are versioned JSON
(default) or msgpack, never pickle. Sends are non-blocking: a slow subscriber
loses messages (seq gaps show it), the inference loop never waits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np
import zmq

from polymorphd.daemon.config import Curve, parse_endpoint
from polymorphd.models.core.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# v 2 = v 1 plus "count" (objects in the frame, from a bundle's count heads). Sent only by bundles with a count
# head, so a stream without one is v 1 byte for byte; every v 1 field keeps its meaning, so v 1 readers that
# ignore unknown keys (DESIGN.md) keep working on v 2 (docs/bundle.md, "Label stream versions").
COUNT_SCHEMA_VERSION = 2
PayloadFormat = Literal["json", "msgpack"]


def encode(payload: dict[str, Any], fmt: PayloadFormat) -> bytes:
    if fmt == "msgpack":
        return msgpack.packb(payload, use_bin_type=True)
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A payload in either format: JSON objects start with '{', msgpack maps never do."""
    if data[:1] == b"{":
        return json.loads(data)
    obj = msgpack.unpackb(data, raw=False)
    if not isinstance(obj, dict):
        raise ValueError(f"payload is a msgpack {type(obj).__name__}, expected a map")
    return obj


def label_payload(
    *,
    camera: str,
    frame_ts: int,
    bundle: str,
    classes: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[int],
    exit: int | str,
    adapters: Sequence[int],
    latency_ms: dict[str, float],
    energy_mj: float | None,
    energy_source: str,
    dropped: int,
    include_scores: bool = False,
    truth: Sequence[int] | None = None,
    count: float | None = None,
) -> dict[str, Any]:
    """A label message body without seq/pub_ts (the publisher stamps those at send time).

    ``count`` (a count head's objects in the frame) makes it a v 2 message with ``"count"``; None: v 1."""
    probs = np.asarray(probs, dtype=np.float64)
    chosen = sorted((int(i) for i in labels), key=lambda i: -probs[i])
    body: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "camera": camera,
        "frame_ts": int(frame_ts),
        "bundle": bundle,
        "labels": [{"id": i, "name": classes[i], "score": round(float(probs[i]), 4)} for i in chosen],
        "exit": exit if isinstance(exit, str) else int(exit),
        "adapters": [int(a) for a in adapters],
        "latency_ms": {k: round(float(v), 3) for k, v in latency_ms.items()},
        "energy_mj": None if energy_mj is None else round(float(energy_mj), 4),
        "energy_source": energy_source,
        "dropped": int(dropped),
    }
    if include_scores:
        body["scores"] = [round(float(p), 4) for p in probs]
    if truth is not None:
        body["truth"] = [int(t) for t in truth]
    if count is not None:
        body["v"] = COUNT_SCHEMA_VERSION
        body["count"] = round(max(0.0, float(count)), 3)
    return body


def load_curve_keys(path: str | Path) -> tuple[bytes, bytes | None]:
    """(public, secret-or-None) from a zmq.auth certificate file; ConfigError says what is wrong."""
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"CURVE key file {path}: {exc}; create keys with zmq.auth.create_certificates(dir, name)"
        ) from exc
    return public, secret


def curve_server(sock: zmq.Socket, curve: Curve) -> None:
    """Make sock a CURVE server with the configured secret key."""
    public, secret = load_curve_keys(curve.server_secret_file)
    if not secret:
        raise ConfigError(
            f"curve.server_secret_file {curve.server_secret_file}: holds no secret key; "
            "give the .key_secret file, not the .key one"
        )
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def curve_client(sock: zmq.Socket, server_public_file: str, client_secret_file: str | None = None) -> None:
    """Make sock a CURVE client of a server whose public key is in server_public_file."""
    server_public, _ = load_curve_keys(server_public_file)
    if client_secret_file:
        public, secret = load_curve_keys(client_secret_file)
        if not secret:
            raise ConfigError(
                f"client key {client_secret_file}: holds no secret key; give the .key_secret file"
            )
    else:  # an ephemeral identity: enough when the server accepts any client key
        public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def attach(sock: zmq.Socket, endpoint: str, default: Literal["bind", "connect"] = "bind") -> str:
    """Bind or connect per the endpoint's form; returns the address (with the real port for tcp://*:0)."""
    how, addr = parse_endpoint(endpoint, default)
    try:
        if how == "bind":
            sock.bind(addr)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(addr)
        return addr
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot {how} {addr}: {exc}; is another daemon using it?") from exc


class Publisher:
    """PUB socket with per-frame seq, topic prefixes and counted, never-blocking sends."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        camera: str,
        fmt: PayloadFormat = "json",
        curve: Curve | None = None,
    ) -> None:
        self.camera, self.fmt = camera, fmt
        self._labels_topic = f"labels/{camera}".encode()
        self._status_topic = f"status/{camera}".encode()
        self.seq = 0  # seq of the next label message
        self.sent = self.dropped = 0
        self._sock = ctx.socket(zmq.PUB)
        self._sock.linger = 0
        if curve is not None:
            curve_server(self._sock, curve)
        try:
            self.address = attach(self._sock, endpoint)
        except ConfigError:
            self._sock.close(0)
            raise

    def publish_labels(self, body: dict[str, Any]) -> dict[str, Any]:
        """Stamp seq and pub_ts, send; seq advances even when the send fails so subscribers see the gap."""
        payload = {**body, "seq": self.seq, "pub_ts": time.time_ns()}
        self.seq += 1
        self._send(self._labels_topic, payload)
        return payload

    def publish_status(self, body: dict[str, Any]) -> None:
        self._send(
            self._status_topic, {"v": SCHEMA_VERSION, "camera": self.camera, "pub_ts": time.time_ns(), **body}
        )

    def _send(self, topic: bytes, payload: dict[str, Any]) -> None:
        try:
            self._sock.send_multipart([topic, encode(payload, self.fmt)], flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1
            log.debug("publish of %s dropped: socket would block", topic)

    def close(self, linger_ms: int = 0) -> None:
        self._sock.close(linger=linger_ms)
