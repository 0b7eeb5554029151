"""The manifest dataclass: strict JSON round trip, schema version, hashes."""

from __future__ import annotations

import hashlib
import json

import pytest

from polymorphd.export.core.manifest import (
    TAIL_TARGETS,
    Manifest,
    base_files,
    base_hash,
    load_manifest,
    sha256_file,
)
from polymorphd.models.core.errors import BundleError


def test_round_trip_is_exact(bundle):
    raw = (bundle / "manifest.json").read_bytes()
    m = load_manifest(bundle)
    assert m.to_json() == raw
    assert Manifest.from_dict(json.loads(raw)).to_dict() == json.loads(raw)


def test_contract_fields(bundle):
    d = json.loads((bundle / "manifest.json").read_text())
    assert list(d)[:6] == ["schema_version", "kind", "bundle_id", "version", "created", "base_sha256"]
    assert d["schema_version"] == 1 and d["kind"] == "full" and d["version"] == 1
    assert d["segments"] == ["segment_0.onnx", "segment_1.onnx"] and d["segment_blocks"] == [[0, 1], [1, 2]]
    assert d["tail_start"] == 2
    assert d["lora"]["names"][0] == "blocks.2.attn.qkv" and d["lora"]["rank"] == 2
    assert d["adapters"][2] == {"context": 2, "file": "adapters/ctx2.onnx_adapter", "rank": 2}


def test_unknown_schema_version_names_both_versions():
    with pytest.raises(
        BundleError, match=r"unsupported schema_version 3 \(this polymorphd reads \[1, 2\]\): re-export"
    ):
        Manifest.from_dict({"schema_version": 3})


def test_unknown_and_missing_keys_are_rejected(bundle):
    d = json.loads((bundle / "manifest.json").read_text())
    with pytest.raises(BundleError, match=r"unknown key\(s\) \['surprise'\]"):
        Manifest.from_dict({**d, "surprise": 1})
    with pytest.raises(BundleError, match=r"version must be of type int, got '1'"):
        Manifest.from_dict({**d, "version": "1"})
    del d["classes"]
    with pytest.raises(BundleError, match=r"missing key\(s\) \['classes'\]"):
        Manifest.from_dict(d)


def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_manifest(tmp_path)


def test_base_sha256_is_the_hash_of_the_graph_hashes_in_order(bundle):
    m = load_manifest(bundle)
    files = base_files(m)
    assert files == ["segment_0.onnx", "segment_1.onnx", "tail.onnx", "tail_lora.onnx", "tail_weights.onnx"]
    digests = [sha256_file(bundle / f) for f in files]
    assert m.base_sha256 == hashlib.sha256("".join(digests).encode()).hexdigest() == base_hash(digests)


def test_files_lists_everything_but_manifest_and_signature(bundle):
    m = load_manifest(bundle)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json", "manifest.sig"}
    assert all(m.files[f] == sha256_file(bundle / f) for f in m.files)


def test_target_dims_come_from_the_model_fields(bundle):
    m = load_manifest(bundle)
    assert [m.target_dims(t) for t in TAIL_TARGETS] == [(48, 144), (48, 48), (48, 192), (192, 48)]
    with pytest.raises(
        BundleError, match=r"manifest\.json: LoRA target 'attn.kv' unknown: valid targets are"
    ):
        m.target_dims("attn.kv")
