"""Control channel: JSON requests on a ZeroMQ REP socket served by its own thread.

Requests (DESIGN.md "Control channel"): ``{"cmd": "status"|"stats"|"rollback"|"reload"}``,
``{"cmd": "load", "path": ".."}``, ``{"cmd": "set", "<knob>": value, ...}``. Every
reply is ``{"ok": bool, ...}``; anything malformed gets ``ok: false`` and an
``error`` string, never a crash. The app supplies one handler per command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq

from polymorphd.daemon.config import Curve, client_address
from polymorphd.daemon.publish import attach, curve_client, curve_server
from polymorphd.models.core.errors import ConfigError, PolymorphError
from polymorphd.models.core.knobs import parse_knobs

log = logging.getLogger(__name__)

COMMANDS = ("status", "stats", "load", "rollback", "reload", "set")
# Requests are a few hundred bytes. ZeroMQ closes the connection of a peer that sends more (MAXMSGSIZE) before
# the message is ever buffered whole, so a hostile client cannot make the daemon allocate a huge request.
MAX_REQUEST_BYTES = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class RequestError(ValueError):
    """A control request that is not valid JSON or not a known command with good arguments."""


def parse_request(raw: bytes) -> dict[str, Any]:
    """Validate one request; RequestError says what a good one looks like."""
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f'request is not UTF-8 JSON ({exc}); send e.g. {{"cmd": "status"}}') from exc
    except RecursionError as exc:  # deep nesting: json's recursive decoder gives up
        raise RequestError("request JSON is nested too deeply; a request is one flat object") from exc
    if not isinstance(req, dict):
        raise RequestError(
            f'request must be a JSON object like {{"cmd": "status"}}, got {type(req).__name__}'
        )
    cmd = req.get("cmd")
    if cmd not in COMMANDS:
        raise RequestError(f"unknown cmd {cmd!r}; expected one of {', '.join(COMMANDS)}")
    if cmd == "load":
        if not isinstance(req.get("path"), str) or not req["path"]:
            raise RequestError('load needs "path": a bundle directory on the daemon host')
        extra = set(req) - {"cmd", "path"}
    elif cmd == "set":
        extra = set()
        if len(req) < 2:
            raise RequestError('set needs at least one knob, e.g. {"cmd": "set", "max_adapters": 1}')
    else:
        extra = set(req) - {"cmd"}
    if extra:
        raise RequestError(f"{cmd} takes no argument(s) {sorted(extra)}")
    return req


class ControlServer:
    """REP socket polled with a timeout, so stop() is prompt.

    A monitor socket watches connections: one that closes before any request was handled since it was accepted
    (a message over MAX_REQUEST_BYTES, which ZeroMQ answers by dropping the connection, or a peer that is not
    ZeroMQ or fails CURVE) is logged, so an oversize request leaves a trace.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        handlers: Mapping[str, Handler],
        curve: Curve | None = None,
        poll_ms: int = 100,
    ) -> None:
        missing = set(COMMANDS) - set(handlers)
        assert not missing, f"handlers missing for {missing}"
        self._handlers = dict(handlers)
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requests = self.errors = 0
        self.dropped_connections = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if curve is not None:
            curve_server(self._sock, curve)
        try:
            self.address = attach(self._sock, endpoint, "bind")
        except ConfigError:
            self._sock.close(0)
            raise
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._accepted: dict[int, int] = {}  # fd -> requests handled when it was accepted

    def handle(self, raw: bytes) -> dict[str, Any]:
        """One request to one reply; never raises."""
        self.requests += 1
        try:
            req = parse_request(raw)
            reply = self._handlers[req["cmd"]](req)
            return {"ok": True, **reply} if "ok" not in reply else reply
        except (RequestError, PolymorphError) as exc:
            self.errors += 1
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a handler bug must not take the channel down
            self.errors += 1
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="polymorphd-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop and close; False when the thread is still busy (its socket is then left open)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("control thread still busy after %.1f s (a load in progress?)", timeout)
                return False  # the socket belongs to that thread; closing it here is unsafe
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        return True

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(self._poll_ms))
            if self._monitor in ready:
                self._connection_event()
            if self._sock not in ready:
                continue
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            reply = self.handle(raw)
            self._sock.send(json.dumps(reply, default=str).encode())

    def _connection_event(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:  # all pending events, so an ACCEPTED is never read after its connection's request
            try:
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(ev["value"])
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self._accepted[fd] = self.requests
            elif ev["event"] == zmq.EVENT_DISCONNECTED and self._accepted.pop(fd, -1) == self.requests:
                self.dropped_connections += 1
                log.warning(
                    "control connection closed before a request was read: a request over %d bytes "
                    "(MAXMSGSIZE), or a peer that is not a ZeroMQ/CURVE client (%d so far)",
                    MAX_REQUEST_BYTES,
                    self.dropped_connections,
                )


def _request_from_args(cmd: str, words: list[str]) -> dict[str, Any]:
    if cmd == "load":
        if len(words) != 1:
            raise ConfigError(f"ctl load takes exactly one PATH, got {len(words)} arguments")
        path = Path(words[0])
        # The daemon may run elsewhere: only make a path absolute when it exists here.
        return {"cmd": "load", "path": str(path.resolve()) if path.exists() else words[0]}
    if cmd == "set":
        if not words:
            raise ConfigError("ctl set needs KEY=VALUE arguments, e.g. ctl set max_adapters=1")
        return {"cmd": "set", **parse_knobs(words, "ctl set")}
    if words:
        raise ConfigError(f"ctl {cmd} takes no arguments, got {words}")
    return {"cmd": cmd}


def request(
    endpoint: str,
    req: dict[str, Any],
    timeout_s: float = 5.0,
    *,
    server_key: str | None = None,
    client_key: str | None = None,
    ctx: zmq.Context | None = None,
) -> dict[str, Any] | None:
    """Send one request; the reply, or None after timeout_s."""
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        if server_key:
            curve_client(sock, server_key, client_key)
        # a server that refuses our CURVE key leaves no peer to send to: sending would block for ever
        sock.sndtimeo = int(timeout_s * 1000)
        sock.connect(client_address(endpoint))
        try:
            sock.send(json.dumps(req).encode())
        except zmq.Again:
            return None
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)


def cli_ctl(args: argparse.Namespace) -> int:
    """``polymorphd ctl``: print the reply as JSON; exit 1 when ok is false or nothing answers."""
    req = _request_from_args(args.cmd, list(args.args))
    try:
        reply = request(
            args.endpoint,
            req,
            args.timeout,
            server_key=getattr(args, "server_key", None),
            client_key=getattr(args, "client_key", None),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if reply is None:
        print(
            f"error: no reply from {args.endpoint} within {args.timeout:g} s; is the daemon running and is "
            "--endpoint its ctl address?",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        print(f"error: {reply.get('error', 'request refused')}", file=sys.stderr)
        return 1
    return 0
