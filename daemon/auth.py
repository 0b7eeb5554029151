"""CURVE keys and client authorisation (ZeroMQ's "ironhouse": encryption, and only listed client keys get in).

``polymorphd keygen --curve --out DIR/NAME`` writes a zmq.auth certificate pair: ``NAME.key`` (public: give the
server's to clients, put clients' in the daemon's ``curve.clients_dir``) and ``NAME.key_secret`` (secret, mode
0600: the daemon's ``curve.server_secret_file``, a client's ``--client-key``). Without ``--curve``, ``keygen``
writes the Ed25519 bundle-signing pair as before. ``ClientAuth`` runs pyzmq's ZAP authenticator for both of the
daemon's sockets and re-reads ``clients_dir`` on ``reload``, so client keys rotate without a restart
(docs/RELIABILITY.md, "Authentication"). Torch-free.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from polymorphd.daemon.config import Curve
from polymorphd.models.core.errors import ConfigError

log = logging.getLogger(__name__)


def generate_curve_keypair(out: str | Path) -> tuple[Path, Path]:
    """zmq.auth certificates OUT.key (public) and OUT.key_secret (secret, created 0600); never overwrites."""
    out = Path(out)
    public, secret = out.with_name(out.name + ".key"), out.with_name(out.name + ".key_secret")
    for p in (public, secret):
        if p.exists():
            raise ConfigError(
                f"key file {p} already exists: refusing to overwrite a key; choose another --out"
            )
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)  # the secret file is never readable by others, not even between write and chmod
    try:
        pub, sec = zmq.auth.create_certificates(str(out.parent), out.name)
    finally:
        os.umask(old)
    os.chmod(pub, 0o644)  # public: clients and the daemon's clients_dir read it
    log.info("wrote CURVE key pair %s, %s", pub, sec)
    return Path(pub), Path(sec)


def cli_keygen(args: argparse.Namespace) -> int:
    """``polymorphd keygen [--curve] --out PATH``."""
    if not getattr(args, "curve", False):
        from polymorphd.export.core.signing import cli_keygen as ed25519_keygen

        return ed25519_keygen(args)
    public, secret = generate_curve_keypair(args.out)
    print(
        f"public key: {public} (server: give it to clients as --server-key; client: copy it to clients_dir)"
    )
    print(f"secret key: {secret} (keep it secret; server: curve.server_secret_file; client: --client-key)")
    return 0


class ClientAuth:
    """The ZAP handler for the daemon's context: CURVE clients whose public key is in clients_dir, or any
    key (encryption only) when clients_dir is null."""

    def __init__(self, ctx: zmq.Context, curve: Curve) -> None:
        self._curve = curve
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self.reload()

    def reload(self) -> int:
        """Re-read clients_dir (key rotation); the number of authorised keys (-1: any key)."""
        if self._curve.clients_dir is None:
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            return -1
        try:
            n = len(zmq.auth.load_certificates(self._curve.clients_dir))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"curve.clients_dir {self._curve.clients_dir}: {exc}") from exc
        self._auth.configure_curve(domain="*", location=self._curve.clients_dir)
        log.info("CURVE: %d authorised client key(s) in %s", n, self._curve.clients_dir)
        return n

    def stop(self) -> None:
        self._auth.stop()
