"""``polymorphd demo`` on a cached bundle: it serves, prints labels beside truth, and scores them."""

from __future__ import annotations

import argparse
import io
import shutil

from polymorphd.daemon.tools import demo


def test_accuracy_counts_exact_matches_and_label_f1():
    acc = demo.Accuracy()
    acc.add({1, 2}, {1, 2}, 0, 0)
    acc.add({1}, {1, 3}, "final", 2)
    acc.add(set(), set(), 1, 0)
    assert acc.frames == 3 and acc.exact == 2
    assert (acc.tp, acc.fp, acc.fn) == (3, 0, 1)
    assert abs(acc.f1 - 6 / 7) < 1e-12
    assert "exact match 66.7%" in acc.line() and "adapters/frame 0.67" in acc.line()
    assert "exit0 33%" in acc.line() and "final 33%" in acc.line()


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir(None) == tmp_path / "polymorphd" / "demo"
    assert demo.cache_dir(str(tmp_path / "x")) == tmp_path / "x"


def test_demo_serves_a_cached_bundle_and_prints_labels_beside_truth(tiny_bundle, tmp_path, capsys):
    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    args = argparse.Namespace(cache=str(tmp_path), seconds=3.0, fps=15.0)
    assert demo.cli_demo(args) == 0
    out = capsys.readouterr().out
    assert f"using the cached bundle {tmp_path / 'bundle'}" in out
    rows = [line for line in out.splitlines() if "labels:" in line and "truth:" in line]
    assert len(rows) >= 10, out
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
