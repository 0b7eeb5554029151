"""How many videos a number needs: calibration and test split size, on finished runs.

    python bench/split_size.py --runs R0 R1 R2 --data BIG --calib-videos 12 --old-test-videos 12 --out OUT.json

BIG is the runs' dataset written again with more validation and test videos (``polymorphd data synth ...
--videos 144 48 48``: video seeds run train, validation, test, so the train videos are the runs' own and the
first validation videos are the old validation split, the next the old test split). Per run, the exits and the
final classifier are calibrated as training does (``stages.calibrate``) twice: on the first ``--calib-videos``
validation videos (the small split) and on all of them; each calibration is scored on the old test videos and
on BIG's test split, which no run has seen, as the engine's early-exit mode answers (the first exit whose
(lo, hi) decides, its scores on the final's scale; else the final classifier), with 95 % intervals over whole
videos (``metrics.video_resamples``). Pure measurement: nothing is written into the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from polymorphd.models.core.calibrate import centre, final_scale
from polymorphd.models.core.exitrule import exit_decides
from polymorphd.models.core.metrics import (
    frame_f1,
    mean_average_precision,
    percentile_interval,
    video_resamples,
)
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.exits import ExitConfig
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig
from polymorphd.models.train import stages
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, SplitData, frozen_features
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.run import load_backbone, load_exits
from polymorphd.models.train.train import load_data


def subset(d: SplitData, videos: np.ndarray, name: str) -> SplitData:
    m = np.isin(d.video_ids, videos)
    return SplitData(name, d.images[m], d.Y[m], d.video_ids[m])


def scores(vit, exits, d: SplitData, ctx: Ctx) -> tuple[np.ndarray, list[np.ndarray]]:
    """The final classifier's and each raw (uncentred) exit's probabilities on ``d``."""
    tokens, final = frozen_features(vit, d.images, ctx, [m.cfg.after_block for m in exits], final=True)
    with torch.no_grad():
        return final, [torch.sigmoid(m(tokens[m.cfg.after_block])).double().numpy() for m in exits]


def early_exit(
    final: np.ndarray, raw: list[np.ndarray], cal: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the engine's early-exit mode publishes per frame: scores (F, K), labels (F, K), answering exit (F,)
    (-1: the final classifier)."""
    thr = np.asarray(cal["class_thresholds"])
    S, L = final.copy(), final > thr
    at = np.full(len(final), -1)
    for j, (p, e) in enumerate(zip(raw, cal["exits"], strict=True)):
        c = centre(p, np.asarray(e["logit_offsets"]))
        d = exit_decides(c, e["lo"], e["hi"]) & (at < 0)
        S[d], L[d], at[d] = final_scale(c[d], thr), c[d] > e["hi"], j
    return S, L, at


def score(Y, vid, final, raw, cal, resamples: int) -> dict:
    Y = Y.astype(bool)
    thr = np.asarray(cal["class_thresholds"])
    S, L, at = early_exit(final, raw, cal)
    Lf = final > thr

    def stats(rows):
        fm, em = mean_average_precision(Y[rows], final[rows])[0], mean_average_precision(Y[rows], S[rows])[0]
        ff, ef = frame_f1(Lf[rows], Y[rows]).mean(), frame_f1(L[rows], Y[rows]).mean()
        return fm, ff, em - fm, ef - ff

    point = stats(np.arange(len(Y)))
    draws = np.array([stats(d) for d in video_resamples(vid, resamples)])
    out = {"videos": len(np.unique(vid)), "exit_rate": float((at >= 0).mean())}
    for i, key in enumerate(("full_map", "full_f1", "map_cost", "f1_cost")):
        out[key] = float(point[i])
        out[f"{key}_ci95"] = percentile_interval(draws[:, i]) if len(draws) else None
    return out


def load_run(run: Path, data_dir: str, loaded: dict) -> tuple:
    """A finished run's preset, backbone and exits, and its dataset at the run's input size (``loaded``
    caches it per size: the runs' own train split gives the same class columns)."""
    cfg = json.loads((run / "config.json").read_text())
    preset = get_preset(cfg["preset"])
    vit = load_backbone(run, VisionTransformer(ViTConfig(**cfg["vit"]))).eval()
    exits = load_exits(run, vit.cfg, [ExitConfig(**e) for e in cfg["exits"]])
    if preset.img_size not in loaded:
        loaded[preset.img_size] = load_data(data_dir, preset.img_size)
    data = loaded[preset.img_size]
    if data.class_ids != cfg["class_ids"]:
        raise SystemExit(f"{run}: its classes are not {data_dir}'s; pass the runs' own dataset")
    return preset, vit, exits, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--data", required=True, help="the runs' dataset with more validation and test videos")
    ap.add_argument("--calib-videos", type=int, required=True, help="the small calibration split's videos")
    ap.add_argument("--old-test-videos", type=int, required=True, help="the small test split's videos")
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, loaded = [], {}
    for run in map(Path, args.runs):
        preset, vit, exits, data = load_run(run, args.data, loaded)
        ctx = Ctx(InputSpec(preset.img_size), preset, DistEnv(), 0, False)
        val, test = data.calib, data.report
        order = np.unique(val.video_ids)  # video ids follow the seeds: the old validation videos come first
        n, t = args.calib_videos, args.old_test_videos
        old_test = subset(val, order[n : n + t], "old-test")
        targets = {
            f"old test ({t} videos)": (old_test, scores(vit, exits, old_test, ctx)),
            f"big test ({len(np.unique(test.video_ids))} videos)": (test, scores(vit, exits, test, ctx)),
        }
        for cal_name, cal_split in ((f"{n} videos", subset(val, order[:n], "small")), ("all", val)):
            cal = stages.calibrate(vit, exits, cal_split, ctx)
            for target, (d, (final, raw)) in targets.items():
                r = score(d.Y, d.video_ids, final, raw, cal, args.resamples)
                rows.append({"run": str(run), "calibrated_on": cal_name, "scored_on": target, **r})
                ci = r["map_cost_ci95"] or (np.nan, np.nan)
                print(
                    f"{run.name:10s} calib {cal_name:9s} {target:22s} full {r['full_map']:.4f} / {r['full_f1']:.3f}  "
                    f"exit rate {r['exit_rate']:5.1%}  early-exit - full: mAP {100 * r['map_cost']:+.2f} "
                    f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]  F1 {r['f1_cost']:+.4f}",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
