"""export_bundle: manifest contents from the run, the export report, atomic write, adapter bundles."""

from __future__ import annotations

import json

import pytest

from polymorphd.daemon.cli import main
from polymorphd.export import bundle as bundle_mod
from polymorphd.export.bundle import export_bundle
from polymorphd.export.core.manifest import load_manifest
from polymorphd.models.core.cost import bundle_gflops
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.train.run import load_run
from tests.conftest import CLASS_THRESHOLDS


def test_manifest_carries_the_runs_calibration_and_costs(bundle, tiny_run):
    m = load_manifest(bundle)
    run = load_run(tiny_run)
    assert m.bundle_id == f"tiny-{m.base_sha256[:4]}"
    assert m.input == {"size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "layout": "NCHW", "color": "RGB"}  # fmt: skip
    assert m.classes == [f"class{i}" for i in range(10)] and m.class_ids[1] == 1007
    assert [c.classes for c in m.contexts] == [[0, 1, 2, 3], [3, 4, 5, 6], [7, 8, 9]]
    assert [(e.after_block, e.file, e.threshold, e.kind) for e in m.exits] == [
        (1, "exit_0.onnx", {"lo": 0.1, "hi": 0.9}, "slvit"),
        (2, "exit_1.onnx", {"lo": 0.1, "hi": 0.9}, "slvit"),
    ]
    assert m.class_thresholds == CLASS_THRESHOLDS
    assert all(e.centred for e in m.exits)  # the run's calibration centred its exits
    assert m.policy == {"max_adapters": 2, "recall_threshold": 0.2}
    assert m.gflops == bundle_gflops(run.vit_config, [[0, 1], [1, 2]], run.exit_configs, run.lora)
    assert m.model == {"embed_dim": 48, "num_tokens": 17, "mlp_hidden": 192, "depth": 4, "num_classes": 10,
                       "patch_size": 8, "in_chans": 3}  # fmt: skip
    assert m.export["exporter"] == "torchscript" and m.export["quantize"] is None


def test_report_lists_sizes_and_latency_per_graph(bundle):
    report = json.loads((bundle / "export_report.json").read_text())
    graphs = [f for f in load_manifest(bundle).graph_files()]
    assert all(report["bytes"][f] == (bundle / f).stat().st_size for f in graphs)
    assert all(report["latency_ms"][f] > 0 for f in graphs)
    assert report["latency_ms"]["threads"] == 2
    assert "quantization" not in report


def test_existing_bundle_is_never_overwritten(bundle, tiny_run):
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists: bundles are immutable"):
        export_bundle(tiny_run, bundle, progress=False)
    assert (bundle / "manifest.json").read_bytes() == before


def test_a_failing_export_leaves_no_partial_bundle(tiny_run, tmp_path, monkeypatch):
    calls = []
    real = bundle_mod.export_graph

    def flaky(spec, path, **kw):
        calls.append(spec.name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(spec, path, **kw)

    monkeypatch.setattr(bundle_mod, "export_graph", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(tiny_run, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_fail_before_exporting(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        export_bundle(tiny_run, tmp_path / "x", quantize="int8", fp16=True)
    with pytest.raises(ConfigError, match="does not exist"):
        export_bundle(tiny_run, tmp_path / "x", sign_key=tmp_path / "no.key")
    assert not (tmp_path / "x").exists()


def test_adapter_bundle_holds_only_adapters_for_the_same_base(adapter_bundle, bundle):
    m, base = load_manifest(adapter_bundle), load_manifest(bundle)
    assert m.kind == "adapters" and m.version == 2 and m.bundle_id == base.bundle_id
    assert m.base_sha256 == base.base_sha256
    assert sorted(m.files) == ["adapters/ctx0.onnx_adapter", "adapters/ctx1.onnx_adapter",
                               "adapters/ctx2.onnx_adapter", "export_report.json"]  # fmt: skip
    assert m.segments == [] and m.tail is None and m.exits == []
    assert m.contexts == base.contexts and m.lora == base.lora and m.classes == base.classes
    assert m.class_thresholds == base.class_thresholds and m.policy == base.policy
    for a in m.adapters:
        assert (adapter_bundle / a.file).read_bytes() == (bundle / a.file).read_bytes()


@pytest.mark.slow
def test_cli_export_prints_the_report(tiny_run, tmp_path, capsys):
    assert main(["export", "--run", str(tiny_run), "--out", str(tmp_path / "b"), "--adapters-only",
                 "--version", "5"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(adapters)" in out and "adapters/ctx0.onnx_adapter" in out and f"wrote {tmp_path / 'b'}" in out
    assert load_manifest(tmp_path / "b").version == 5
