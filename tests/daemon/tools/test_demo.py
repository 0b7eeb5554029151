"""``polymorphd demo`` on a cached bundle: it serves, prints labels beside truth, and scores them."""

from __future__ import annotations

import argparse
import io
import re
import shutil

import pytest

from polymorphd.daemon.tools import demo


def test_accuracy_scores_per_frame_label_f1_and_exact_match_overall_and_per_exit():
    import numpy as np

    from polymorphd.models.core.metrics import label_quality

    frames = [
        ({1, 2}, {1, 2}, 0, 0),
        ({1}, {1, 3}, "final", 2),
        (set(), set(), 1, 0),
        ({4}, set(), "final", 2),
    ]
    acc = demo.Accuracy()
    for f in frames:
        acc.add(*f)
    pred, truth = np.zeros((2, len(frames), 5), dtype=bool)
    for i, (p, t, _, _) in enumerate(frames):
        pred[i, list(p)], truth[i, list(t)] = True, True
    want = label_quality(pred, truth)  # the definition eval and the training report use
    assert acc.frames == 4 and acc.exact == 2
    assert acc.f1 == pytest.approx(want["label_f1"]) == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    line = acc.line()
    assert f"exact match {want['exact_match']:.1%}" in line and f"label F1 {acc.f1:.3f}" in line
    assert "adapters/frame 1.00" in line
    assert "exit0 25% (F1 1.000)" in line and "exit1 25% (F1 1.000)" in line
    assert "final 50% (F1 0.333)" in line  # (2/3 + 0) / 2


def test_truth_the_model_never_predicted_is_named_from_the_bundle():
    classes = [f"digit/{i}" for i in range(10)] + ["shirt"]
    msg = {"seq": 7, "exit": "final", "latency_ms": {"inference": 1.5}}
    line = demo.frame_line(msg, {1}, {1, 3, 10}, classes)
    assert "labels: digit/1 " in line and "truth: digit/1, digit/3, shirt " in line
    assert demo.names(set(), classes) == "-" and demo.names({12}, classes) == "#12"


def test_bundle_classes_are_the_manifests(tiny_bundle):
    assert demo.bundle_classes(tiny_bundle) == [f"class{i}" for i in range(10)]


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir(None) == tmp_path / "polymorphd" / "demo"
    assert demo.cache_dir(str(tmp_path / "x")) == tmp_path / "x"


def test_demo_serves_a_cached_bundle_and_prints_labels_beside_truth(tiny_bundle, tmp_path, capsys):
    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    # stops on the frame count, not the clock: a loaded machine serves fewer frames a second
    args = argparse.Namespace(cache=str(tmp_path), seconds=None, frames=10, fps=15.0)
    assert demo.cli_demo(args) == 0
    out = capsys.readouterr().out
    assert f"using the cached bundle {tmp_path / 'bundle'}" in out
    rows = [line for line in out.splitlines() if "labels:" in line and "truth:" in line]
    assert len(rows) == 10, out
    # every class is named from the manifest (class0..class9); the default camera's ids beyond the tiny
    # bundle's 10 classes are marked as such, never printed as bare numbers
    for row in rows:
        for part in (row.split("labels:")[1].split("truth:")[0], row.split("truth:")[1]):
            *whole, last = part.strip().split(", ")  # the column is cut at 40 characters
            assert all(re.fullmatch(r"-|class\d|#\d{2,}", name) for name in whole), row
            assert not last.isdigit(), row
    assert "are not among the bundle's 10 classes" in out
    assert "demo finished:" in out and "frames: exact match" in out


def test_a_corrupt_cached_bundle_is_moved_aside_not_deleted(tiny_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "tail.onnx").write_bytes(b"corrupt")
    rebuilt = []
    monkeypatch.setattr("polymorphd.models.data.synth.write_dataset", lambda *a, **k: rebuilt.append("data"))
    monkeypatch.setattr("polymorphd.models.train.train.train", lambda *a, **k: rebuilt.append("train"))
    monkeypatch.setattr(
        "polymorphd.export.bundle.export_bundle", lambda run, out: rebuilt.append("export") or out
    )
    out = io.StringIO()
    assert demo.ensure_bundle(tmp_path, out) == bundle
    assert rebuilt == ["data", "train", "export"]
    assert "the cached bundle is unusable" in out.getvalue() and "tail.onnx" in out.getvalue()
    assert len(list(tmp_path.glob("bundle.broken-*"))) == 1
