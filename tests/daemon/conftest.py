"""Real bundles for the engine and eval tests, exported once per session from the tiny random run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """A full bundle of the tiny run (fp32, unsigned)."""
    export = pytest.importorskip("polymorphd.export.bundle")
    return export.export_bundle(tiny_run, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def swap_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's base with other contexts and adapters (for adapter bundle swaps)."""
    import torch

    from polymorphd.models.nn.lora import ContextAdapter
    from polymorphd.models.train.run import load_run, save_torch, write_json

    path = tmp_path_factory.mktemp("runs") / "swap"
    shutil.copytree(tiny_run, path)
    run = load_run(path)
    contexts = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    torch.manual_seed(7)
    adapters = []
    for _ in contexts:
        a = ContextAdapter(run.vit_config, run.lora, run.vit.head)
        with torch.no_grad():
            for p in a.lora_B.values():
                p.normal_(std=0.1)
        adapters.append(a)
    save_torch(path / "adapters.pt", [a.state_dict() for a in adapters])
    write_json(path / "contexts.json", {"contexts": contexts, "coverage": {"1": 0.7, "2": 1.0, "3": 1.0}})
    cal = json.loads((path / "calibration.json").read_text())
    cal["class_thresholds"] = [0.45] * 10
    write_json(path / "calibration.json", cal)
    return path


@pytest.fixture(scope="session")
def swap_bundle(swap_run, tmp_path_factory) -> Path:
    export = pytest.importorskip("polymorphd.export.bundle")
    return export.export_bundle(
        swap_run, tmp_path_factory.mktemp("bundles") / "swap", adapters_only=True, version=2
    )


@pytest.fixture(scope="session")
def foreign_adapter_bundle(swap_bundle, tmp_path_factory) -> Path:
    """The swap adapter bundle, re-labelled as made for another base (unsigned, so the manifest may change)."""
    path = tmp_path_factory.mktemp("bundles") / "foreign"
    shutil.copytree(swap_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["base_sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_realsize(tiny_bundle, tmp_path_factory) -> Path:
    """Real-size bundles (fp32, int8, plain.onnx) of the tiny bundle's classes at a tiny geometry."""
    realsize = pytest.importorskip("polymorphd.export.realsize")
    geometry = realsize.Geometry(name="tiny", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    out = tmp_path_factory.mktemp("realsize") / "tiny"
    return realsize.build_realsize(tiny_bundle, out, geometry=geometry, precisions=("fp32", "int8"))
