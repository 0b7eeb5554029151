"""Real-size bundles with random weights: what the engine costs at DeiT-Tiny geometry (``polymorphd bench``).

The trained presets are 64x64 models; a board runs 224x224 ones. ``build_realsize`` makes a run with random
(untrained) weights at DeiT-Tiny geometry (224x224, patch 16, width 192, 12 blocks, 3 heads, patch stem), exits
and LoRA blocks placed as in the ``base`` preset (scaled from its 9 blocks to 12: exits after blocks 4 and 8,
LoRA on the last 4), and the classes, contexts, class thresholds and policy of a trained bundle (``like``), so
the per-frame exit and adapter decisions recorded on that bundle can be replayed on it (``daemon/tools/replay``).
It exports that run as bundles, fp32 and int8 (and fp16 when asked), plus ``plain.onnx``: the whole generalist
forward as ONE graph, the plain ONNX Runtime baseline that the segmented full path is measured against.
Weights are random, so only the timings mean anything. Needs torch (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymorphd.export.bundle import export_bundle
from polymorphd.export.onnx import export_graph
from polymorphd.export.plan import GraphSpec
from polymorphd.export.quantize import quantize_int8
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.nn.exits import ExitConfig, build_exit
from polymorphd.models.nn.lora import ContextAdapter, LoRAConfig
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig
from polymorphd.models.train.presets import PRESETS
from polymorphd.models.train.run import save_run_modules

log = logging.getLogger(__name__)

PLAIN = "plain.onnx"
PLAIN_INT8 = "plain_int8.onnx"
INFO = "realsize.json"


@dataclass(frozen=True)
class Geometry:
    """Backbone geometry of the real-size model; exits and LoRA follow ``base`` scaled to ``depth``."""

    name: str = "deit-tiny"
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3

    def vit(self, num_classes: int) -> ViTConfig:
        return ViTConfig(
            img_size=self.img_size,
            patch_size=self.patch_size,
            num_classes=num_classes,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            stem="patch",
        )

    def exits(self) -> list[ExitConfig]:
        base = PRESETS["base"]
        # the same pooling factor as base (its 8x8 grid pooled to 4x4): DeiT-Tiny's 14x14 grid pools to 7x7
        factor = (base.img_size // base.patch_size) // base.exit_pool_grid
        grid = self.img_size // self.patch_size
        pool = grid // factor if grid % factor == 0 else grid
        return [
            replace(ec, after_block=max(1, round(ec.after_block * self.depth / base.depth)), pool_grid=pool)
            for ec in base.exit_configs("slvit")
        ]

    def lora(self) -> LoRAConfig:
        base = PRESETS["base"].lora_config()
        return replace(base, last_blocks=max(1, round(base.last_blocks * self.depth / PRESETS["base"].depth)))


DEIT_TINY = Geometry()


class _Probs(nn.Module):
    """The generalist's whole forward with the bundle graphs' output (sigmoid probabilities)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.vit(image))


def make_run(like: Path, out: Path, geometry: Geometry = DEIT_TINY, seed: int = 0) -> Path:
    """A run directory at ``geometry`` with random weights and ``like``'s classes, contexts and thresholds."""
    m = json.loads((like / "manifest.json").read_text())
    k = len(m["classes"])
    torch.manual_seed(seed)
    vit_cfg, lora_cfg, exit_cfgs = geometry.vit(k), geometry.lora(), geometry.exits()
    if len(exit_cfgs) != len(m["exits"]):
        raise BundleError(
            f"bundle {like} has {len(m['exits'])} exits, the real-size geometry {len(exit_cfgs)}: its recorded "
            "exit decisions cannot be replayed on it"
        )
    vit = VisionTransformer(vit_cfg).eval()
    exits = [build_exit(vit_cfg, ec).eval() for ec in exit_cfgs]
    contexts = [list(c["classes"]) for c in m["contexts"]]
    adapters = []
    for _ in contexts:
        a = ContextAdapter(vit_cfg, lora_cfg, vit.head)
        with torch.no_grad():
            for p in a.lora_B.values():
                p.normal_(std=0.02)  # a non-zero delta, as a trained adapter has
        adapters.append(a.eval())
    config = {
        "preset": f"realsize-{geometry.name}",
        "vit": vit_cfg.to_dict(),
        "lora": lora_cfg.to_dict(),
        "exits": [ec.to_dict() for ec in exit_cfgs],
        "input": {**m["input"], "size": geometry.img_size},
        "classes": list(m["classes"]),
        "class_ids": list(m.get("class_ids", range(k))),
    }
    calibration = {
        "class_thresholds": list(m.get("class_thresholds", [0.5] * k)),
        "exits": [{"lo": e["threshold"]["lo"], "hi": e["threshold"]["hi"]} for e in m["exits"]],
        "policy": dict(m.get("policy", {})),
    }
    save_run_modules(
        out,
        config=config,
        vit=vit,
        exits=exits,
        contexts=contexts,
        adapters=adapters,
        coverage={},
        calibration=calibration,
    )
    return out


def export_plain(run_vit: VisionTransformer, img_size: int, path: Path) -> float:
    """The whole generalist forward as one graph (the plain ONNX Runtime baseline); max |ORT - torch|."""

    def make(b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": torch.randn(b, 3, img_size, img_size, generator=g)}

    spec = GraphSpec("plain", _Probs(run_vit).eval(), ("image",), ("probs",), {"image": {0: "batch"}}, make)
    return export_graph(spec, path)


def build_realsize(
    like: str | Path,
    out: str | Path,
    *,
    geometry: Geometry = DEIT_TINY,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    seed: int = 0,
) -> Path:
    """Write ``out``/{run, fp32, int8, fp16 ...}, plain.onnx (+ plain_int8.onnx) and realsize.json."""
    like, out = Path(like), Path(out)
    bad = [p for p in precisions if p not in ("fp32", "int8", "fp16")]
    if bad or "fp32" not in precisions:
        raise ConfigError(f"precisions {list(precisions)} invalid: fp32 plus any of int8, fp16")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty: choose a new directory for the real-size bundles")
    out.mkdir(parents=True, exist_ok=True)
    run = make_run(like, out / "run", geometry, seed)
    info: dict[str, Any] = {
        "geometry": geometry.__dict__,
        "like": str(like),
        "seed": seed,
        "bundles": {},
        "failed": {},
        "weights": "random (timings only)",
    }
    for p in precisions:
        try:
            export_bundle(
                run,
                out / p,
                quantize="int8" if p == "int8" else None,
                fp16=p == "fp16",
                bench_runs=2,
                progress=False,
            )
            info["bundles"][p] = p
        except Exception as exc:  # fp16 export may fail on CPU-only ONNX Runtime: record why, keep the rest
            if p == "fp32":
                raise
            log.warning("real-size %s bundle not written: %s", p, exc)
            info["failed"][p] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    from polymorphd.models.train.run import load_run

    vit = load_run(run).vit
    info["plain"] = {"fp32": PLAIN, "max_abs_diff": export_plain(vit, geometry.img_size, out / PLAIN)}
    if "int8" in info["bundles"]:
        quantize_int8(out / PLAIN, out / PLAIN_INT8)
        info["plain"]["int8"] = PLAIN_INT8
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--like", required=True, help="trained bundle whose classes, contexts and thresholds to copy"
    )
    p.add_argument("--out", required=True, help="directory to create (bundles, plain.onnx, realsize.json)")
    p.add_argument("--fp16", action="store_true", help="also try an fp16 bundle")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    precisions = ("fp32", "int8", "fp16") if a.fp16 else ("fp32", "int8")
    out = build_realsize(a.like, a.out, precisions=precisions, seed=a.seed)
    print(f"wrote {out}: {json.loads((out / INFO).read_text())}")
    return 0
