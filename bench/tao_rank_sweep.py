"""LoRA rank / blocks sweep of the polymorph recipe (one seed): generalist vs adapters, no exits, no export.

For each (rank, last_blocks): the recipe's generalist (the adapters' total budget) and adapters on the frozen
pretrained ``small`` backbone, the contexts clustered as training clusters them; prints the mean over
contexts of adapter - generalist mAP on each context's classes and both models' mAP over all classes. Usage:

    python bench/tao_rank_sweep.py --data TAO_DIR [--configs 16x1 4x2] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from polymorphd.models.core.contexts import cluster_contexts
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.checkpoint import checkpoint_stem, init_from
from polymorphd.models.nn.lora import merged_copy
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import recipe
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.pretrain import shipped_checkpoint
from polymorphd.models.train.train import load_data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--configs", nargs="+", default=["16x1"], help="RANKxBLOCKS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = str(shipped_checkpoint("small"))
    base_preset = replace(recipe.recipe_preset(get_preset("small")), stem=checkpoint_stem(ckpt))
    data = load_data(a.data, base_preset.img_size, seed=a.seed)
    contexts = cluster_contexts(data.train.Y, max_size=base_preset.max_context_size)
    out = []
    for cfg in a.configs:
        rank, blocks = (int(v) for v in cfg.split("x"))
        preset = replace(base_preset, lora_rank=rank, lora_alpha=2.0 * rank, lora_last_blocks=blocks)
        ctx = Ctx(
            spec=InputSpec(size=preset.img_size), preset=preset, env=DistEnv(), seed=a.seed, progress=False
        )
        torch.manual_seed(a.seed)
        base = VisionTransformer(preset.vit_config(len(data.class_ids)))
        init_from(base, ckpt, num_classes=len(data.class_ids))
        gen_adapter, _ = recipe.train_generalist(
            base, data.train, data.calib, data.report, ctx, len(contexts)
        )
        generalist = merged_copy(base, gen_adapter)
        _, res = recipe.train_adapters(
            base, generalist, contexts, data.train, data.calib, data.report, ctx, full_tail=False
        )
        gains = [
            r["map_adapter"] - r["map_generalist"] for r in res["adapters"] if r["map_adapter"] is not None
        ]
        row = {
            "rank": rank, "last_blocks": blocks, "gain": float(np.mean(gains)),
            "generalist_map": res["recipe"]["generalist"]["map"],
            "adapters_everywhere_map": res["recipe"]["adapters_everywhere"]["map"],
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
