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
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class RequestError(ValueError):
    """A control request that is not valid JSON or not a known command with good arguments."""


def parse_request(raw: bytes) -> dict[str, Any]:
    """Validate one request; RequestError says what a good one looks like."""
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f'request is not UTF-8 JSON ({exc}); send e.g. {{"cmd": "status"}}') from exc
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
    """REP socket polled with a timeout, so stop() is prompt."""

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
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        if curve is not None:
            curve_server(self._sock, curve)
        try:
            self.address = attach(self._sock, endpoint, "bind")
        except ConfigError:
            self._sock.close(0)
            raise

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
        self._sock.close(linger=0)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(self._poll_ms, zmq.POLLIN):
                continue
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            reply = self.handle(raw)
            self._sock.send(json.dumps(reply, default=str).encode())


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
        sock.connect(client_address(endpoint))
        sock.send(json.dumps(req).encode())
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
