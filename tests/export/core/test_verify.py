"""``bundle verify`` accepts good bundles and rejects every kind of damage with a message naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from polymorphd.daemon.cli import main
from polymorphd.export.core.manifest import base_files, base_hash, load_manifest, sha256_file
from polymorphd.export.core.verify import verify_bundle
from polymorphd.export.onnx import write_tensor_file
from polymorphd.models.core.errors import BundleError

FILES = [
    "adapters/ctx0.onnx_adapter",
    "adapters/ctx1.onnx_adapter",
    "adapters/ctx2.onnx_adapter",
    "exit_0.onnx",
    "exit_1.onnx",
    "export_report.json",
    "segment_0.onnx",
    "segment_1.onnx",
    "tail.onnx",
    "tail_base.onnx_adapter",
    "tail_lora.onnx",
    "tail_weights.onnx",
]


def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "b"))


def verify_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["bundle", "verify", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def rehash(root: Path) -> None:
    """Rewrite manifest hashes after a deliberate edit (and drop the now-stale signature)."""
    d = json.loads((root / "manifest.json").read_text())
    d["files"] = {f: sha256_file(root / f) for f in d["files"]}
    m = load_manifest(root)
    d["base_sha256"] = base_hash(d["files"][f] for f in base_files(m))
    (root / "manifest.json").write_text(json.dumps(d))
    (root / "manifest.sig").unlink(missing_ok=True)


def test_good_bundle_verifies(bundle, keypair, capsys):
    assert verify_cli(capsys, str(bundle), "--pubkey", str(keypair[1]))[:2] == (
        0,
        f"OK {load_manifest(bundle).ident} (12 files, signed)\n",
    )
    assert verify_cli(capsys, str(bundle))[1].endswith("(12 files, signed, not checked: no --pubkey)\n")


def test_parametrized_files_are_all_the_files(bundle):
    assert sorted(load_manifest(bundle).files) == FILES


@pytest.mark.parametrize("name", [*FILES, "manifest.json", "manifest.sig"])
def test_a_changed_byte_anywhere_is_rejected(bundle, keypair, tmp_path, capsys, name):
    root = copy(bundle, tmp_path)
    data = bytearray((root / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / name).write_bytes(bytes(data))
    rc, out, err = verify_cli(capsys, str(root), "--pubkey", str(keypair[1]))
    assert rc != 0 and out == ""
    if name.startswith("manifest"):
        assert "manifest.sig: signature does not verify" in err
    else:
        assert f"{root / name}: sha256" in err and "differs from the manifest" in err


def test_a_missing_file_is_rejected(bundle, tmp_path, capsys):
    root = copy(bundle, tmp_path)
    (root / "tail_lora.onnx").unlink()
    rc, _, err = verify_cli(capsys, str(root))
    assert rc == 2 and f"{root / 'tail_lora.onnx'}: missing" in err


def test_an_unlisted_file_is_rejected(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    (root / "extra.onnx").write_bytes((root / "tail.onnx").read_bytes())
    with pytest.raises(BundleError, match=r"extra\.onnx: not listed in manifest\.json"):
        verify_bundle(root)


def test_signature_required_when_pubkey_given(bundle, keypair, tmp_path, capsys):
    root = copy(bundle, tmp_path)
    (root / "manifest.sig").unlink()
    rc, _, err = verify_cli(capsys, str(root), "--pubkey", str(keypair[1]))
    assert rc == 2 and "manifest.sig: missing: a public key was given" in err
    assert verify_cli(capsys, str(root))[1].endswith("(12 files, unsigned)\n")


def test_wrong_key_is_rejected(bundle, tmp_path, capsys):
    from polymorphd.export.core.signing import generate_keypair

    _, other = generate_keypair(tmp_path / "other.key")
    rc, _, err = verify_cli(capsys, str(bundle), "--pubkey", str(other))
    assert rc == 2 and "manifest.sig: signature does not verify with public key" in err


def test_unknown_schema_version_is_rejected(bundle, tmp_path, capsys):
    root = copy(bundle, tmp_path)
    d = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**d, "schema_version": 7}))
    rc, _, err = verify_cli(capsys, str(root))
    assert rc == 2 and "manifest.json: unsupported schema_version 7 (this polymorphd reads [1, 2])" in err


def test_adapter_bundle_against_its_base(bundle, adapter_bundle, int8_bundle, capsys):
    rc, out, _ = verify_cli(capsys, str(adapter_bundle), "--base", str(bundle))
    assert rc == 0 and out.startswith("OK ") and "(4 files, unsigned)" in out
    rc, _, err = verify_cli(capsys, str(adapter_bundle), "--base", str(int8_bundle))
    assert rc == 2 and "base_sha256" in err and "does not match base" in err and "manifest.json" in err


def test_graph_with_wrong_inputs_is_rejected(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    shutil.copy(root / "segment_0.onnx", root / "segment_1.onnx")  # image input where tokens are expected
    rehash(root)
    with pytest.raises(
        BundleError, match=r"segment_1\.onnx: input\(s\) \['tokens'\] not found in graph inputs"
    ):
        verify_bundle(root)


def test_adapter_with_wrong_shapes_is_rejected(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    params = ort.AdapterFormat.read_adapter(str(root / "adapters/ctx1.onnx_adapter")).get_parameters()
    good = {k: v.numpy().copy() for k, v in params.items()}
    good["head_b"] = np.zeros((1, 9), np.float32)
    (root / "adapters/ctx1.onnx_adapter").unlink()
    write_tensor_file(root / "adapters/ctx1.onnx_adapter", good)
    rehash(root)
    with pytest.raises(BundleError, match=r"ctx1\.onnx_adapter: tensor head_b dim 1 is 9, expected 10"):
        verify_bundle(root)


def test_verify_runs_without_torch(bundle, keypair):
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{m!r}] = None\n" for m in ("torch", "onnx", "onnxscript"))
        + "from polymorphd.daemon.cli import main\n"
        + f"sys.exit(main(['bundle', 'verify', {str(bundle)!r}, '--pubkey', {str(keypair[1])!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK ")
