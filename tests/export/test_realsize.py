"""Real-size bundles for bench: DeiT-Tiny geometry with exits and LoRA placed as in ``base``, and the checks."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from polymorphd.export.realsize import DEIT_TINY, Geometry, build_realsize, make_run
from polymorphd.models.core.errors import BundleError, ConfigError


def test_deit_tiny_geometry_places_exits_and_lora_as_base_does():
    vit = DEIT_TINY.vit(32)
    assert (vit.img_size, vit.patch_size, vit.embed_dim, vit.depth, vit.num_heads) == (224, 16, 192, 12, 3)
    assert vit.stem == "patch"
    # base: exits after blocks 3 and 6 of 9, LoRA on the last 3; its 8x8 token grid pooled to 4x4
    exits = DEIT_TINY.exits()
    assert [e.after_block for e in exits] == [4, 8]
    assert {(e.kind, e.width, e.pool_grid) for e in exits} == {("slvit", 160, 7)}
    assert DEIT_TINY.lora().last_blocks == 4 and DEIT_TINY.lora().rank == 8
    for e in exits:
        e.validate(vit)


def test_make_run_copies_the_bundles_classes_contexts_and_thresholds(bundle, tmp_path):
    geometry = Geometry(name="t", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    run = make_run(bundle, tmp_path / "run", geometry)
    m = json.loads((bundle / "manifest.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == m["classes"] and config["input"]["size"] == 32
    contexts = json.loads((run / "contexts.json").read_text())["contexts"]
    assert contexts == [c["classes"] for c in m["contexts"]]
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["class_thresholds"] == pytest.approx(m["class_thresholds"])


def test_build_realsize_refuses_bad_precisions_and_a_used_directory(bundle, tmp_path):
    with pytest.raises(ConfigError, match="precisions"):
        build_realsize(bundle, tmp_path / "a", precisions=("int8",))
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    with pytest.raises(BundleError, match="not empty"):
        build_realsize(bundle, used)


def test_a_bundle_with_another_exit_count_cannot_be_replayed(bundle, tmp_path):
    other = tmp_path / "b"
    other.mkdir()
    m = json.loads((bundle / "manifest.json").read_text())
    m["exits"] = m["exits"][:1]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="1 exits, the real-size geometry 2"):
        make_run(other, tmp_path / "run")
