"""Ed25519 keys and detached manifest signatures."""

from __future__ import annotations

import stat

import pytest

from polymorphd.daemon.cli import main
from polymorphd.export.core.signing import generate_keypair, sign, verify_signature
from polymorphd.models.core.errors import BundleError, ConfigError


def test_keygen_writes_private_0600_and_public(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "k.pub" in capsys.readouterr().out


def test_keygen_creates_the_key_directory(tmp_path):
    assert main(["keygen", "--out", str(tmp_path / "keys" / "bundle.key")]) == 0
    assert (tmp_path / "keys" / "bundle.key.pub").exists()
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_keygen_refuses_to_overwrite(tmp_path):
    generate_keypair(tmp_path / "k")
    with pytest.raises(ConfigError, match="already exists: refusing to overwrite"):
        generate_keypair(tmp_path / "k")


def test_sign_and_verify(tmp_path):
    priv, pub = generate_keypair(tmp_path / "a")
    _, other_pub = generate_keypair(tmp_path / "b")
    sig = sign(b'{"x": 1}', priv)
    assert len(sig) == 64
    verify_signature(b'{"x": 1}', sig, pub)
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_signature(b'{"x": 2}', sig, pub)
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_signature(b'{"x": 1}', sig, other_pub)


def test_bad_key_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        sign(b"x", tmp_path / "missing")
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        sign(b"x", tmp_path / "junk")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_signature(b"x", b"0" * 64, tmp_path / "junk")
