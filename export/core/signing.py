"""Ed25519 signatures over manifest.json (``cryptography``). Torch-free.

``manifest.sig`` holds the 64 raw signature bytes over the exact bytes of ``manifest.json``; the manifest
lists every other file's sha256, so one signature covers the whole bundle.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from polymorphd.models.core.errors import BundleError, ConfigError

log = logging.getLogger(__name__)


def public_path(private_path: str | Path) -> Path:
    p = Path(private_path)
    return p.with_name(p.name + ".pub")


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key (PEM, mode 0600) at ``path`` and its public key at ``path.pub``."""
    priv, pub = Path(path), public_path(path)
    for p in (priv, pub):
        if p.exists():
            raise ConfigError(
                f"key file {p} already exists: refusing to overwrite a key; choose another --out"
            )
    priv.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # create with 0600 from the start: the key must never be readable by others, even briefly
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    log.info("wrote Ed25519 key pair %s, %s", priv, pub)
    return priv, pub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not an unencrypted PEM private key ({exc}); create one with polymorphd keygen"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, expected an Ed25519 key (polymorphd keygen)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(
            f"{path}: not a PEM public key ({exc}); pass the .pub file polymorphd keygen wrote"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, expected an Ed25519 public key")
    return key


def sign(manifest_bytes: bytes, key_path: str | Path) -> bytes:
    """Detached Ed25519 signature (64 bytes) over ``manifest_bytes``."""
    return load_private_key(key_path).sign(manifest_bytes)


def verify_signature(manifest_bytes: bytes, sig: bytes, pubkey_path: str | Path) -> None:
    """Raise BundleError unless ``sig`` is a valid signature of ``manifest_bytes`` under the public key."""
    key = load_public_key(pubkey_path)
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature as exc:
        raise BundleError(
            f"manifest.sig: signature does not verify with public key {pubkey_path}: manifest.json was "
            "changed after signing, or it was signed with another key"
        ) from exc


def cli_keygen(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair(args.out)
    print(f"private key: {priv} (keep it secret; export --sign-key {priv})")
    print(f"public key:  {pub} (give it to the daemon / bundle verify --pubkey)")
    return 0


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
