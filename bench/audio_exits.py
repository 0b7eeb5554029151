"""Visual vs audiovisual exits (each with a count head) on trained runs' frozen backbones, one run per seed.

    python bench/audio_exits.py --runs /work/runs/pre_s0 /work/runs/pre_s1 /work/runs/pre_s2 \
        --data /work/out14/data_av --out bench/results/audio_exits.json

The dataset must come from ``polymorphd data synth --audio`` (its frames equal the dataset the runs were
trained on when made with the same options, so the runs' test videos stay unseen). Seed i trains its exits
with seed i on run i's backbone (``models/train/avexits.py``); the table is mean +- std over the runs, on
the test split: mAP, label F1, exit rate at the preset's tolerance (labels and count decided), count MAE
against the final block's count head, and the cascade's mean exit depth (lower: frames leave earlier).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import add_seed_runs, check_seed_runs

from polymorphd.models.core.melspec import MelConfig
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import avexits
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.train import load_data


def one_seed(
    run: Path,
    data,
    seed: int,
    views: int,
    epochs: int | None,
    mel: MelConfig,
    copycat: bool = True,
    visual_dropout: float = 0.0,
) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    preset = get_preset(cfg["preset"])
    if epochs:
        preset = replace(preset, exits=replace(preset.exits, epochs=epochs))
    vit = VisionTransformer(preset.vit_config(len(data.class_ids)))
    vit.load_state_dict(torch.load(run / "backbone.pt", map_location="cpu", weights_only=True))
    ctx = Ctx(InputSpec(preset.img_size), preset, DistEnv(), seed, False)
    t0 = time.perf_counter()
    exits, final = avexits.train(
        vit, data.train, ctx, mel, views, audio_probe=True, copycat=copycat, visual_dropout=visual_dropout
    )
    res = avexits.measure(
        data.calib,
        data.report,
        avexits.predict(vit, exits, final, data.calib, ctx),
        avexits.predict(vit, exits, final, data.report, ctx),
        ctx,
    )
    res["seconds"] = time.perf_counter() - t0
    res["run"], res["seed"] = str(run), seed
    return res


def table(summary: dict) -> str:
    def f(pair, digits=3):
        return "n/a" if pair[0] is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    rows = [
        "| exit | mAP | label F1 | exit rate (labels) | exit rate (labels + count) | count MAE |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in summary["exits"].items():
        rows.append(
            f"| {name} | {f(e['map'])} | {f(e['label_f1'])} | {f(e['label_exit_rate'])} | {f(e['exit_rate'])} "
            f"| {f(e['count_mae'])} |"
        )
    fin = summary["final"]
    rows.append(f"| final | {f(fin['map'])} | {f(fin['label_f1'])} | | | {f(fin['count_mae'])} |")
    rows.append("")
    for kind, c in summary["cascade"].items():
        shares = ", ".join(f"{k} {f(v, 2)}" for k, v in c["shares"].items())
        rows.append(f"- {kind} cascade: mean exit depth {f(c['mean_depth'], 2)} blocks; shares {shares}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_seed_runs(ap, merge_help="only summarise these --out files of earlier runs")
    ap.add_argument(
        "--views", type=int, default=1, help="augmented views per training frame (crop/flip/colour)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's exit epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--visual-dropout",
        type=float,
        default=0.0,
        help="share of training samples whose audiovisual exits see no trunk tokens (modality dropout)",
    )
    ap.add_argument(
        "--labels-only", action="store_true", help="train on labels alone (no copycat), an ablation"
    )
    ap.add_argument("--out", default=None, help="write the per-seed results and the summary as JSON")
    args = ap.parse_args()
    check_seed_runs(ap, args)
    torch.set_num_threads(args.threads)
    mel = MelConfig()
    if args.merge:
        results = [r for f in args.merge for r in json.loads(Path(f).read_text())["seeds"]]
        summary = avexits.summarise([{k: r[k] for k in ("exits", "final", "cascade")} for r in results])
        print(f"test split, {len(results)} seed(s), mean ± std:\n{table(summary)}")
        if args.out:
            doc = {"merged": args.merge, "seeds": results, "summary": summary, "mel": mel.to_dict()}
            Path(args.out).write_text(json.dumps(doc, indent=1))
        return
    if not args.runs or not args.data:
        ap.error("--runs and --data are required unless --merge is given")
    size = json.loads((Path(args.runs[0]) / "config.json").read_text())["preset_config"]["img_size"]
    data = load_data(args.data, size, audio=mel)
    results = []
    for seed, run in enumerate(args.runs, start=args.first_seed):
        results.append(
            one_seed(
                Path(run), data, seed, args.views, args.epochs, mel, not args.labels_only, args.visual_dropout
            )
        )
        print(f"seed {seed} ({run}): {results[-1]['seconds']:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"seeds": results, "mel": mel.to_dict()}, indent=1))
    summary = avexits.summarise([{k: r[k] for k in ("exits", "final", "cascade")} for r in results])
    print(f"test split, {len(results)} seed(s), mean ± std:\n{table(summary)}")
    if args.out:
        doc = {
            "args": vars(args),
            "seeds": results,
            "summary": summary,
            "mel": mel.to_dict(),
            "views": args.views,
        }
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
