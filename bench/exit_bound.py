"""The exit bound's confidence: each run's exits calibrated as training does (``stages.calibrate``) on the whole
validation split at several ``exit_confidence`` values, scored on the test split as the engine's early-exit
mode answers, with 95 % intervals over whole videos. Pure measurement: nothing is written into the runs.

    python bench/exit_bound.py --runs R0 R1 R2 --data D [--confidence 0 1.645] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from split_size import load_run, score, scores

from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.train import stages
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--data", required=True, help="the runs' dataset (its validation and test splits)")
    ap.add_argument("--confidence", nargs="+", type=float, default=[0.0, 1.645])
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, loaded = [], {}
    for run in map(Path, args.runs):
        preset, vit, exits, data = load_run(run, args.data, loaded)
        final, raw = scores(
            vit, exits, data.report, Ctx(InputSpec(preset.img_size), preset, DistEnv(), 0, False)
        )
        for z in args.confidence:
            ctx = Ctx(InputSpec(preset.img_size), replace(preset, exit_confidence=z), DistEnv(), 0, False)
            cal = stages.calibrate(vit, exits, data.calib, ctx)
            r = score(data.report.Y, data.report.video_ids, final, raw, cal, args.resamples)
            r |= {
                "run": str(run),
                "confidence": z,
                "exit_rates_calibration": [e["exit_rate"] for e in cal["exits"]],
            }
            rows.append(r)
            ci = r["f1_cost_ci95"] or (np.nan, np.nan)
            print(
                f"{run.name:14s} z {z:5.3f}  full {r['full_map']:.4f} / {r['full_f1']:.3f}  exit rate "
                f"{r['exit_rate']:6.1%}  early-exit - full: mAP {100 * r['map_cost']:+.2f}  F1 {r['f1_cost']:+.4f} "
                f"[{ci[0]:+.4f}, {ci[1]:+.4f}]",
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
