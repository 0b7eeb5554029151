"""Test mAP and label F1 of the generalist against the number of training videos, at fixed compute.

Every point trains the same number of optimizer steps (``--steps`` batches), so a bigger dataset gets fewer
epochs: the curve answers "at this budget, how many distinct videos should a preset see?" (issue 10). All
points share one master dataset's validation and test videos; point N trains on its first N train videos.

    polymorphd data synth --out /work/data/curve --videos 144 6 6
    python bench/data_curve.py --data /work/data/curve --sizes 24 48 96 144 --steps 540 \\
        --init-from models/pretrained/small.pt --seeds 0 --out bench/results/data_curve.json

Only the generalist stage runs (the stage that sets the model's quality); thresholds for label F1 are the
global F1-best one on the calibration split, as training chooses for classes with few positives.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from polymorphd.models.core.calibrate import global_threshold
from polymorphd.models.core.metrics import label_quality
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.checkpoint import checkpoint_stem
from polymorphd.models.nn.checkpoint import init_from as load_init
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import stages
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, SplitData, predict
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.train import load_data


def first_videos(data: SplitData, n: int) -> SplitData:
    """The first ``n`` videos of a split (frames are stored video by video, in frame order)."""
    starts = np.flatnonzero(np.r_[True, data.video_ids[1:] != data.video_ids[:-1]])
    if n > len(starts):
        raise SystemExit(f"the dataset has {len(starts)} train videos; {n} asked")
    k = starts[n] if n < len(starts) else len(data.Y)
    boxes = None if data.boxes is None else data.boxes[:k]
    return SplitData(data.name, data.images[:k], data.Y[:k], data.video_ids[:k], boxes)


def point(args, ds, n: int, seed: int) -> dict:
    preset = get_preset(args.preset)
    lr = args.lr or preset.generalist.lr
    preset = replace(preset, generalist=replace(preset.generalist, lr=lr), generalist_steps=args.steps)
    if args.init_from:
        preset = replace(preset, stem=checkpoint_stem(args.init_from))
    train = first_videos(ds.train, n)
    preset = preset.for_frames(len(train.Y))
    epochs = preset.generalist.epochs
    ctx = Ctx(spec=InputSpec(size=preset.img_size), preset=preset, env=DistEnv(), seed=seed, progress=True)
    torch.manual_seed(seed)
    vit = VisionTransformer(preset.vit_config(len(ds.class_ids)))
    if args.init_from:
        load_init(vit, args.init_from, num_classes=len(ds.class_ids))
    t0 = time.perf_counter()
    res = stages.train_generalist(vit, train, ds.calib, ds.report, ctx)
    secs = time.perf_counter() - t0
    t = global_threshold(ds.calib.Y.astype(bool), predict(vit, ds.calib.images, ctx))
    q = label_quality(predict(vit, ds.report.images, ctx) > t, ds.report.Y)
    return {
        "videos": n, "seed": seed, "epochs": epochs, "lr": lr,
        "steps": math.ceil(len(train.Y) / preset.generalist.batch_size) * epochs,
        "map_test": res["map"], "map_calibration": res["map_calibration"],
        "label_f1_test": q["label_f1"], "exact_test": q["exact_match"],
        "seconds": round(secs, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="master dataset (>= max(sizes) train videos)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[24, 48, 96, 144])
    ap.add_argument("--steps", type=int, default=540, help="generalist optimizer steps per point")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--init-from", default=None, help="pretrained checkpoint (default: from scratch)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr", type=float, default=None, help="generalist learning rate (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON file for the points (rewritten after each)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    ds = load_data(args.data, preset.img_size, progress=True)
    points = []
    for n in args.sizes:
        for seed in args.seeds:
            points.append(point(args, ds, n, seed))
            print(json.dumps(points[-1]))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "points": points}, indent=2) + "\n")
    for n in args.sizes:
        rows = [p for p in points if p["videos"] == n]
        m = np.array([[p["map_test"], p["label_f1_test"]] for p in rows])
        print(f"{n:4d} videos: test mAP {m[:, 0].mean():.4f} ± {m[:, 0].std():.4f}, "
              f"label F1 {m[:, 1].mean():.4f} ± {m[:, 1].std():.4f} ({len(rows)} seeds)")  # fmt: skip


if __name__ == "__main__":
    main()
