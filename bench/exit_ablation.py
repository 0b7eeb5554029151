"""Exit designs on a trained run's frozen backbone: SL-ViT vs MLP, width, augmented views, over seeds.

    python bench/exit_ablation.py --run /work/runs/small --data /work/data/synth --views 0 8 --widths 96 112 128

Every variant trains with copycat (the preset's weights and temperature) on cached trunk tokens, exactly as
the exits stage does (``stages.exit_training_set``), and is scored on the report split (test mAP) and on the
clean training frames (train mAP, to show overfitting). Prints mean +- std over ``--seeds``: the report split
has few videos, so one seed's difference of 0.03 mAP is noise.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.exits import build_exit
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import stages
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, fit, frozen_features
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.train import load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run directory (its backbone.pt is used)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--views", type=int, nargs="+", default=[0, 8], help="augmented views per frame")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="SL-ViT widths (default: preset's)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's exit epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = json.loads((Path(args.run) / "config.json").read_text())
    preset = get_preset(cfg["preset"])
    if args.epochs:
        preset = replace(preset, exits=replace(preset.exits, epochs=args.epochs))
    data = load_data(args.data, preset.img_size)
    vit = VisionTransformer(preset.vit_config(len(data.class_ids)))
    vit.load_state_dict(torch.load(Path(args.run) / "backbone.pt", map_location="cpu", weights_only=True))
    stages.freeze(vit)
    positions = list(preset.exit_after)
    test_tokens, _ = frozen_features(
        vit, data.report.images, Ctx(InputSpec(preset.img_size), preset, DistEnv(), 0, False), positions
    )
    n = len(data.train.Y)
    kinds = [("slvit", w) for w in (args.widths or [preset.exit_width])] + [("mlp", preset.exit_mlp_hidden)]
    print(f"{'views':>5} {'block':>5} {'exit':>12} {'test mAP':>16} {'train mAP':>9} {'s/run':>6}")
    for views in args.views:
        ctx = Ctx(InputSpec(preset.img_size), replace(preset, exit_views=views), DistEnv(), 0, False)
        tokens, Y, teacher = stages.exit_training_set(vit, data.train, ctx, positions)
        T = stages.copycat_targets(teacher, preset)
        for b in positions:
            for kind, width in kinds:
                ec = next(e for e in preset.exit_configs(kind) if e.after_block == b)
                ec = replace(ec, width=width) if kind == "slvit" else ec
                scores, t0 = [], time.perf_counter()
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    m = build_exit(vit.cfg, ec)

                    def step(idx: torch.Tensor, m=m, x=tokens[b], Y=Y, T=T) -> torch.Tensor:
                        return stages.exit_loss(m(x[idx]), Y[idx], T[idx], preset)

                    fit(list(m.named_parameters()), len(Y), step, ctx.preset.exits, ctx, "exit")
                    m.eval()
                    with torch.no_grad():
                        test = mean_average_precision(
                            data.report.Y, torch.sigmoid(m(test_tokens[b])).numpy()
                        )[0]
                        train = mean_average_precision(data.train.Y, torch.sigmoid(m(tokens[b][:n])).numpy())[
                            0
                        ]
                    scores.append((test, train))
                s = np.array(scores)
                name = f"{kind} w{width}" if kind == "slvit" else "mlp"
                print(
                    f"{views:>5} {b:>5} {name:>12} {s[:, 0].mean():>9.4f} ± {s[:, 0].std():.3f} {s[:, 1].mean():>9.3f} "
                    f"{(time.perf_counter() - t0) / args.seeds:>6.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
