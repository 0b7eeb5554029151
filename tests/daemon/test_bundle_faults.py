"""Bundle faults against a serving daemon (the real engine, a signing key configured): each bad bundle offered
with ``ctl load`` is refused with a reason that names the file, and the running bundle keeps serving with no
``seq`` gap (Triton's promise: a failed reload keeps the old model serving). docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from polymorphd.daemon.app import Daemon
from polymorphd.daemon.control import request
from polymorphd.export.core.manifest import base_files, base_hash, load_manifest, sha256_file
from polymorphd.export.core.signing import generate_keypair, sign
from tests.daemon.fakes import FlakyOpener, Sub, config, running

pytestmark = pytest.mark.slow  # exports the tiny bundles once (shared with the other engine tests)


def resign(root: Path, key: Path, *, rehash: bool = False) -> Path:
    """Sign root's manifest with key; with rehash, first make its hashes match the (deliberately edited) files."""
    if rehash:
        d = json.loads((root / "manifest.json").read_text())
        d["files"] = {f: sha256_file(root / f) for f in d["files"] if (root / f).is_file()}
        if d["kind"] == "full":
            d["base_sha256"] = base_hash(d["files"][f] for f in base_files(load_manifest(root)))
        (root / "manifest.json").write_text(json.dumps(d))
    (root / "manifest.sig").write_bytes(sign((root / "manifest.json").read_bytes(), key))
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys") / "bundle.key")


@pytest.fixture(scope="module")
def signed(tiny_bundle: Path, swap_bundle: Path, keys, tmp_path_factory) -> dict[str, Path]:
    """The tiny base (v1) and its adapter bundle (v2), signed with the configured key."""
    root = tmp_path_factory.mktemp("signed")
    return {
        "base": resign(Path(shutil.copytree(tiny_bundle, root / "base")), keys[0]),
        "adapters": resign(Path(shutil.copytree(swap_bundle, root / "adapters")), keys[0]),
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shape_adapter(path: Path) -> None:
    from polymorphd.export.onnx import write_tensor_file

    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    tensors = {k: v.numpy().copy() for k, v in params.items()}
    tensors["head_b"] = np.zeros((1, 9), np.float32)  # 9 classes where the base has 10
    path.unlink()
    write_tensor_file(path, tensors)


def _other_key(root: Path, key: Path) -> None:
    other, _ = generate_keypair(root.parent / f"{root.name}-other.key")
    resign(root, other)


# name -> (which signed bundle to start from, the damage, the file the reason must name, words of the reason)
FAULTS: dict[str, tuple[str, Callable[[Path, Path], None], str, str]] = {
    "truncated file": ("base", lambda r, k: _truncate(r / "segment_1.onnx"), "segment_1.onnx", "sha256"),
    "flipped byte": (
        "base",
        lambda r, k: _flip(r / "tail_lora.onnx"),
        "tail_lora.onnx",
        "differs from the manifest",
    ),
    "missing signature": (
        "base",
        lambda r, k: (r / "manifest.sig").unlink(),
        "manifest.sig",
        "must be signed",
    ),
    "wrong signature": ("adapters", _other_key, "manifest.sig", "does not verify"),
    "adapter bundle for another base": (
        "adapters",
        lambda r, k: resign(r, k) if _set_manifest(r, base_sha256="0" * 64) else None,
        "manifest.json",
        "made for base 000000000000",
    ),
    "manifest names a missing file": (
        "adapters",
        lambda r, k: (r / "adapters/ctx1.onnx_adapter").unlink(),
        "ctx1.onnx_adapter",
        "missing (listed in manifest.json)",
    ),
    "adapter with wrong shapes": (
        "adapters",
        lambda r, k: (_wrong_shape_adapter(r / "adapters/ctx0.onnx_adapter"), resign(r, k, rehash=True)),
        "ctx0.onnx_adapter",
        "tensor head_b dim 1 is 9, expected 10",
    ),
    "graph ONNX Runtime cannot load": (
        "base",
        lambda r, k: ((r / "exit_1.onnx").write_bytes(b"\x08\x07garbage" * 64), resign(r, k, rehash=True)),
        "exit_1.onnx",
        "ONNX Runtime cannot load this graph",
    ),
    "symlink inside the bundle": (
        "adapters",
        lambda r, k: _symlink_file(r / "export_report.json"),
        "export_report.json",
        "a symbolic link",
    ),
}


def _set_manifest(root: Path, **fields) -> bool:
    d = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**d, **fields}))
    return True


def _symlink_file(path: Path) -> None:
    """The file replaced by a symlink to an identical copy outside the bundle (hash still matches)."""
    outside = path.parent.parent / f"{path.parent.name}-outside-{path.name}"
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)


@pytest.fixture(scope="module")
def served(signed, keys, tmp_path_factory) -> Iterator[Daemon]:
    """A daemon serving the signed base with the public key configured; frames at 200/s."""
    work = tmp_path_factory.mktemp("faults")
    cfg = config(work, signed["base"], pubkey=str(keys[1]), threads=1, drop_policy="block")
    with running(cfg, None, FlakyOpener()) as d:
        yield d


def refused_without_gap(d: Daemon, path: Path) -> str:
    """Offer path; return the error. Meanwhile the stream must go on from the same bundle without a seq gap."""
    sub = Sub(d.publisher.address, "labels/")
    try:
        before = sub.until(lambda t, p: True)  # joined: from here on every message must arrive
        serving = d.engine.bundle_id
        reply = request(d.control.address, {"cmd": "load", "path": str(path)}, 60)
        assert reply is not None and reply["ok"] is False, reply
        last = d.publisher.seq
        msgs = before + sub.until(lambda t, p: p["seq"] >= last + 5)
    finally:
        sub.close()
    seqs = [p["seq"] for _, p in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"seq gap around the refused load: {seqs}"
    assert {p["bundle"] for _, p in msgs} == {serving}
    assert d.engine.bundle_id == serving and d.frame_errors == 0
    return reply["error"]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_bundle_is_refused_naming_the_file_and_serving_goes_on(fault, served, signed, keys, tmp_path):
    start, damage, file, words = FAULTS[fault]
    bad = Path(shutil.copytree(signed[start], tmp_path / f"bad-{start}"))
    damage(bad, keys[0])
    error = refused_without_gap(served, bad)
    assert file in error and words in error, error


def test_an_older_signed_bundle_is_refused_as_an_update(signed, keys, tmp_path):
    """TUF-style: with a key configured, the version in the signed manifest never goes down by a load."""
    cfg = config(tmp_path, signed["base"], pubkey=str(keys[1]), threads=1, drop_policy="block")
    with running(cfg, None, FlakyOpener()) as d:
        ok = request(d.control.address, {"cmd": "load", "path": str(signed["adapters"])}, 60)
        assert ok is not None and ok["ok"] and ok["bundle"].endswith("@2"), ok
        error = refused_without_gap(d, signed["base"])  # v1, validly signed, but older than v2
        assert f"{signed['base'] / 'manifest.json'}" in error
        assert "version 1 is older than version 2 already served" in error and "--version 3" in error
        back = request(d.control.address, {"cmd": "rollback"}, 10)  # the operator's way back still works
        assert back is not None and back["ok"] and back["bundle"].endswith("@1")
        again = request(d.control.address, {"cmd": "load", "path": str(signed["adapters"])}, 60)
        assert again is not None and again["ok"], again  # the same version again is not a rollback


def test_without_a_key_unsigned_bundles_load_in_any_order(tiny_bundle, swap_bundle, tmp_path):
    """No key configured: the pre-existing contract (no signatures, no version rule) is unchanged."""
    with running(config(tmp_path, tiny_bundle, threads=1), None, FlakyOpener()) as d:
        for path, version in ((swap_bundle, 2), (tiny_bundle, 1)):
            reply = request(d.control.address, {"cmd": "load", "path": str(path)}, 60)
            assert reply is not None and reply["ok"] and reply["bundle"].endswith(f"@{version}"), reply
