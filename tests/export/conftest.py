"""Bundles of the tiny run, exported once per session (export is the slow part of these tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    from polymorphd.export.core.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "bundle.key")


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def bundle(tiny_run, keypair, bundles_dir) -> Path:
    """A signed fp32 full bundle."""
    from polymorphd.export.bundle import export_bundle

    return export_bundle(tiny_run, bundles_dir / "full", sign_key=keypair[0], bench_runs=3, progress=False)


@pytest.fixture(scope="session")
def adapter_bundle(tiny_run, bundles_dir) -> Path:
    from polymorphd.export.bundle import export_bundle

    return export_bundle(tiny_run, bundles_dir / "adapters", adapters_only=True, progress=False)


def make_tao_split(root: Path, split: str, class_ids: list[int], *, videos: int = 2, frames: int = 8) -> Path:
    """A tiny TAO-format split: random 32x32 frames with random label sets."""
    import cv2

    rng = np.random.default_rng(1)
    images, annotations = [], []
    for v in range(videos):
        (root / "frames" / f"v{v}").mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            iid = v * frames + f
            name = f"v{v}/{f:04d}.png"
            cv2.imwrite(str(root / "frames" / name), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            images.append(
                {"id": iid, "video_id": v, "frame_index": f, "file_name": name, "width": 32, "height": 32}
            )
            for cid in rng.choice(class_ids, size=3, replace=False):
                annotations.append(
                    {"image_id": iid, "category_id": int(cid), "bbox": [0, 0, 4, 4], "track_id": 0}
                )
    data = {
        "videos": [{"id": v, "name": f"v{v}"} for v in range(videos)],
        "images": images,
        "annotations": annotations,
        "tracks": [],
        "categories": [{"id": c, "name": f"class{i}"} for i, c in enumerate(class_ids)],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def run_with_data(tiny_run, tmp_path_factory) -> Path:
    """The tiny run, with config.json naming a small TAO dataset (for the int8 mAP comparison)."""
    base = tmp_path_factory.mktemp("data_run")
    run = Path(shutil.copytree(tiny_run, base / "tiny_data"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["dataset"] = str(make_tao_split(base / "tao", "validation", cfg["class_ids"]))
    (run / "config.json").write_text(json.dumps(cfg))
    return run


@pytest.fixture(scope="session")
def int8_bundle(run_with_data, bundles_dir) -> Path:
    from polymorphd.export.bundle import export_bundle

    return export_bundle(run_with_data, bundles_dir / "int8", quantize="int8", bench_runs=3, progress=False)
