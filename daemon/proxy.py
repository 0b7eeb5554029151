"""``polymorphd proxy``: XSUB/XPUB forwarder so a fleet of daemons shares one subscriber endpoint.

Daemons publish with ``pub: connect:tcp://PROXY:FRONTEND``; subscribers connect
to the backend. Subscriptions flow upstream, so daemons only send what someone
asked for.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import zmq

from polymorphd.daemon.publish import attach

log = logging.getLogger(__name__)


class Proxy:
    """zmq.proxy_steerable on its own thread; stop() sends TERMINATE over an inproc control pair."""

    def __init__(self, frontend: str, backend: str, ctx: zmq.Context | None = None) -> None:
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self._xsub, self._xpub = self.ctx.socket(zmq.XSUB), self.ctx.socket(zmq.XPUB)
        self._ctl_in, self._ctl_out = self.ctx.socket(zmq.PAIR), self.ctx.socket(zmq.PAIR)
        for s in (self._xsub, self._xpub, self._ctl_in, self._ctl_out):
            s.linger = 0
        try:
            self.frontend = attach(self._xsub, frontend, "bind")
            self.backend = attach(self._xpub, backend, "bind")
        except Exception:
            self._close()
            raise
        ctl_addr = f"inproc://polymorphd-proxy-{id(self)}"
        self._ctl_in.bind(ctl_addr)
        self._ctl_out.connect(ctl_addr)
        self._thread = threading.Thread(target=self._run, name="polymorphd-proxy", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("proxy: publishers -> %s, subscribers -> %s", self.frontend, self.backend)

    def _run(self) -> None:
        zmq.proxy_steerable(self._xsub, self._xpub, None, self._ctl_in)  # returns on TERMINATE

    def stop(self, timeout: float = 1.0) -> None:
        if self._thread.is_alive():
            self._ctl_out.send(b"TERMINATE")
            self._thread.join(timeout)
        self._close()

    def _close(self) -> None:
        for s in (self._xsub, self._xpub, self._ctl_in, self._ctl_out):
            s.close(0)
        if self._own_ctx:
            self.ctx.term()


def cli_proxy(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    stop = threading.Event()
    proxy = Proxy(args.frontend, args.backend)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proxy.start()
        print(f"proxy: publishers connect to {proxy.frontend}, subscribers to {proxy.backend}", flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        proxy.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
