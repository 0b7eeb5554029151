"""Which part of the audiovisual exits' recipe costs mAP: augmentation x count term, on trained runs' frozen
backbones, one run per seed, beside the run's deployed visual exits (the exits stage's).

    python bench/avexits_recipe.py --runs /work/runs/r10_s0 --data /work/out14/data_av --out s0.json
    python bench/avexits_recipe.py --merge s0.json s1.json s2.json --out bench/results/avexits_recipe.json

For each augmentation (``avexits.features``: "plain", crop/flip/colour with the clean frame's labels, count
and sound; "exits", the exits stage's copy-paste + mixup with the sound and count following the picture) the
trunk runs once over the training frames and the preset's views; on that cache the visual and audiovisual
exits train with the count L1 term (weight ``avexits.COUNT_WEIGHT``) and without it (0). Every variant is
scored by ``avexits.measure`` on the test split; the deployed exits (``exits.pt``) by mAP and label F1 at
their own thresholds on the same frames.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from harness import add_seed_runs, check_seed_runs

from polymorphd.models.core.melspec import MelConfig
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import avexits, run
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, frozen_features
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.stages import labels_at_own_thresholds
from polymorphd.models.train.train import load_data

KEYS = ("map", "label_f1", "label_exit_rate", "exit_rate", "count_mae")


def deployed(run_dir: Path, vit: VisionTransformer, data, ctx: Ctx) -> dict:
    """The run's deployed visual exits (the exits stage's SL-ViT copycat ones) on the test split."""
    p = ctx.preset
    exits = run.load_exits(run_dir, vit.cfg, p.exit_configs("slvit"), fused_attn=False)
    out = {}
    for split in (data.calib, data.report):
        feats, _ = frozen_features(vit, split.images, ctx, list(p.exit_after))
        with torch.no_grad():
            for m in exits:
                z = m(feats[m.cfg.after_block])
                out[split.name, m.cfg.after_block] = torch.sigmoid(z).numpy().astype(np.float64)
    res = {}
    for b in p.exit_after:
        pc, pr = out[data.calib.name, b], out[data.report.name, b]
        own = labels_at_own_thresholds(data.calib.Y, pc, data.report.Y, pr, p.threshold_min_positives)
        res[f"deployed@{b}"] = {
            "map": float(mean_average_precision(data.report.Y, pr)[0]),
            "label_f1": own["label_f1"],
        }
    return res


def one_seed(run_dir: Path, data, seed: int, mel: MelConfig, variants: list[str], save=None) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())
    preset = get_preset(cfg["preset"])
    vit = VisionTransformer(preset.vit_config(len(data.class_ids)))
    vit.load_state_dict(torch.load(run_dir / "backbone.pt", map_location="cpu", weights_only=True))
    ctx = Ctx(InputSpec(preset.img_size), preset, DistEnv(), seed, False)
    result: dict = {"run": str(run_dir), "seed": seed, "variants": {}, "seconds": {}}
    result["deployed"] = deployed(run_dir, vit, data, ctx)
    positions = list(preset.exit_after)
    # AUGMENT:WEIGHT[:GRAD], GRAD the share of the count gradient reaching the exits' layers (default 0)
    fields = [v.split(":") for v in variants]
    for augment in avexits.AUGMENTS:
        weights = [(float(f[1]), float(f[2]) if len(f) > 2 else 0.0) for f in fields if f[0] == augment]
        if not weights:
            continue
        t0 = time.perf_counter()
        cache = avexits.features(
            vit, data.train, ctx, positions, avexits.VIEWS, seed=seed * 7919 + 13, augment=augment
        )
        for weight, grad in weights:
            exits, final = avexits.train(
                vit, data.train, ctx, mel, avexits.VIEWS, count_weight=weight, count_grad=grad, cache=cache
            )
            res = avexits.measure(
                data.calib,
                data.report,
                avexits.predict(vit, exits, final, data.calib, ctx),
                avexits.predict(vit, exits, final, data.report, ctx),
                ctx,
            )
            name = f"{augment}, count {weight:g}" + (f", count gradient {grad:g}" if grad else "")
            result["variants"][name] = {
                "exits": {k: {key: e[key] for key in KEYS} for k, e in res["exits"].items()},
                "final": res["final"],
                "cascade": res["cascade"],
            }
            if save is not None:
                save(result)
            print(f"seed {seed} {name}: " + ", ".join(
                f"{k} {e['map']:.3f}" for k, e in res["exits"].items()
            ), flush=True)  # fmt: skip
        result["seconds"][augment] = time.perf_counter() - t0
        del cache
    return result


def table(results: list[dict]) -> str:
    def f(vals: list) -> str:
        v = [x for x in vals if x is not None]
        return "n/a" if not v else f"{np.mean(v):.3f} ± {np.std(v):.3f}"

    rows = [
        "| variant | exit | seeds | mAP | label F1 | label exit rate | count MAE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in results[0]["deployed"]:
        e = [r["deployed"][name] for r in results]
        rows.append(f"| deployed (exits stage) | {name} | {len(e)} | {f([x['map'] for x in e])} | "
                    f"{f([x['label_f1'] for x in e])} | | |")  # fmt: skip
    variants = dict.fromkeys(v for r in results for v in r["variants"])  # seeds may hold different variants
    for v in variants:
        have = [r["variants"][v] for r in results if v in r["variants"]]
        for name in have[0]["exits"]:
            e = [h["exits"][name] for h in have]
            rows.append(
                f"| {v} | {name} | {len(e)} | {f([x['map'] for x in e])} | {f([x['label_f1'] for x in e])} | "
                f"{f([x['label_exit_rate'] for x in e])} | {f([x['count_mae'] for x in e])} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_seed_runs(ap, merge_help="only tabulate these --out files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[f"{a}:{w:g}" for a in avexits.AUGMENTS for w in (avexits.COUNT_WEIGHT, 0.0)],
        help="AUGMENT:COUNT_WEIGHT[:COUNT_GRAD] to train (default: both augmentations, count term on and off; "
        "COUNT_GRAD, the share of the count gradient reaching the exits' layers, 0 unless given)",
    )
    ap.add_argument("--out", default=None, help="write the per-seed results as JSON")
    args = ap.parse_args()
    check_seed_runs(ap, args)
    torch.set_num_threads(args.threads)
    mel = MelConfig()
    if args.merge:
        results = [r for f in args.merge for r in json.loads(Path(f).read_text())["seeds"]]
    else:
        size = json.loads((Path(args.runs[0]) / "config.json").read_text())["preset_config"]["img_size"]
        data = load_data(args.data, size, audio=mel)
        results = []
        for seed, run_dir in enumerate(args.runs, start=args.first_seed):

            def save(partial: dict, done: list = results) -> None:
                if args.out:
                    Path(args.out).write_text(json.dumps({"seeds": [*done, partial]}, indent=1))

            results.append(one_seed(Path(run_dir), data, seed, mel, args.variants, save))
            if args.out:
                Path(args.out).write_text(json.dumps({"seeds": results}, indent=1))
    print(f"test split, {len(results)} seed(s), mean ± std:\n{table(results)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": results, "table": table(results)}, indent=1))


if __name__ == "__main__":
    main()
