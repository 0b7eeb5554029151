"""Shared fixtures: a tiny random run (no training) that export and engine tests build on."""

from __future__ import annotations

from pathlib import Path

import pytest

CLASS_THRESHOLDS = [0.3 + 0.04 * i for i in range(10)]


def make_tiny_run(path: Path, seed: int = 0) -> Path:
    """A complete run directory with random (not trained) tiny modules; LoRA B is non-zero so adapters matter."""
    import torch

    from polymorphd.models.nn.exits import ExitConfig, build_exit
    from polymorphd.models.nn.lora import ContextAdapter, LoRAConfig
    from polymorphd.models.nn.vit import VisionTransformer, ViTConfig
    from polymorphd.models.train.run import save_run_modules

    torch.manual_seed(seed)
    vit_cfg = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=4, num_heads=3)
    lora_cfg = LoRAConfig(rank=2, alpha=4.0, last_blocks=2)
    exit_cfgs = [
        ExitConfig(after_block=1, width=24, num_heads=2),
        ExitConfig(after_block=2, width=24, num_heads=2),
    ]
    vit = VisionTransformer(vit_cfg).eval()
    exits = [build_exit(vit_cfg, ec).eval() for ec in exit_cfgs]
    contexts = [[0, 1, 2, 3], [3, 4, 5, 6], [7, 8, 9]]
    adapters = []
    for _ in contexts:
        a = ContextAdapter(vit_cfg, lora_cfg, vit.head)
        with torch.no_grad():
            for p in a.lora_B.values():
                p.normal_(std=0.05)
            a.head.weight.add_(torch.randn_like(a.head.weight) * 0.05)
        adapters.append(a.eval())
    config = {
        "preset": "tiny",
        "vit": vit_cfg.to_dict(),
        "lora": lora_cfg.to_dict(),
        "exits": [ec.to_dict() for ec in exit_cfgs],
        "input": {
            "size": 32,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "layout": "NCHW",
            "color": "RGB",
        },
        "classes": [f"class{i}" for i in range(10)],
        "class_ids": [1000 + 7 * i for i in range(10)],
    }
    # calibrated like a trained run: per-class thresholds, exits centred on their own (logit_offsets)
    calibration = {
        "class_thresholds": CLASS_THRESHOLDS,
        "exits": [
            {"lo": 0.1, "hi": 0.9, "logit_offsets": [0.3 * ((i * 7 + j) % 5 - 2) for i in range(10)]}
            for j in range(2)
        ],
        "policy": {"max_adapters": 2, "recall_threshold": 0.2},
    }
    save_run_modules(
        path,
        config=config,
        vit=vit,
        exits=exits,
        contexts=contexts,
        coverage={"1": 0.5, "2": 0.8, "3": 1.0},
        adapters=adapters,
        calibration=calibration,
    )
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny")
