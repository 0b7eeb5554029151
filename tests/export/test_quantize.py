"""int8 / fp16 exports: graphs still verify, LoRA inputs stay fp32, the report gives speed and mAP change."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from polymorphd.export.bundle import export_bundle
from polymorphd.export.core.manifest import load_manifest
from polymorphd.export.core.timing import session
from polymorphd.export.core.verify import verify_bundle
from polymorphd.export.quantize import full_path_scores, weight_matmuls


def test_int8_report_lists_speed_and_map_change(int8_bundle):
    q = json.loads((int8_bundle / "export_report.json").read_text())["quantization"]
    assert q["mode"] == "int8"
    assert set(q["graphs"]) == set(load_manifest(int8_bundle).graph_files())
    assert all(g["fp32_ms"] > 0 and g["int8_ms"] > 0 for g in q["graphs"].values())
    mp = q["map"]
    assert mp["split"] == "validation" and mp["frames"] == 16
    assert 0 <= mp["fp32"] <= 1 and 0 <= mp["int8"] <= 1
    assert mp["change"] == pytest.approx(mp["int8"] - mp["fp32"], abs=1e-4)


def test_int8_quantizes_weights_only(int8_bundle):
    m = load_manifest(int8_bundle)
    assert m.export["quantize"] == "int8"
    tail = onnx.load(str(int8_bundle / "tail.onnx"))
    ops = {n.op_type for n in tail.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert weight_matmuls(tail) == []  # every weight MatMul became integer
    lora = session(int8_bundle / "tail_lora.onnx")
    assert all(i.type == "tensor(float)" for i in lora.get_inputs())
    verify_bundle(int8_bundle)


def test_int8_scores_stay_close_to_fp32(int8_bundle, bundle):
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    m = load_manifest(bundle)
    a, b = full_path_scores(bundle, m, x), full_path_scores(int8_bundle, m, x)
    assert a.shape == b.shape == (4, 10)
    assert np.max(np.abs(a - b)) < 0.05


@pytest.mark.slow
def test_without_a_dataset_the_report_says_so(tiny_run, tmp_path):
    out = export_bundle(tiny_run, tmp_path / "fp16", fp16=True, bench_runs=2, progress=False)
    q = json.loads((out / "export_report.json").read_text())["quantization"]
    assert q["mode"] == "fp16" and "fp16_ms" in q["graphs"]["tail.onnx"]
    assert "mAP change not measured" in q["map"]["note"]
    assert load_manifest(out).export["fp16"] is True
