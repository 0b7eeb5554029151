"""Add the per-class recall cuts (manifest ``policy.class_recall``) to a run trained before they existed.

Training's calibration stage fits them now (``stages.fit_class_recall``); a run finished earlier has
everything they need but the block itself. This copies the run to ``--out`` (weights untouched, nothing
retrained), scores the run's calibration split with its last exit exactly as calibration does (the exit
centred on its own thresholds, as the daemon reads it), and writes the block into the copy's
calibration.json; ``polymorphd export --run OUT`` then carries it into the manifest. Usage:

    python bench/recalibrate_selection.py --run RUN --data DATA --out NEW_RUN [--recall 0.9] [--min-positives 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from polymorphd.models.core.knobs import CLASS_RECALL_KEY
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, frozen_features
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.run import CALIBRATION, load_run
from polymorphd.models.train.stages import fit_class_recall
from polymorphd.models.train.train import load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the dataset the run was trained on")
    ap.add_argument("--out", type=Path, required=True, help="the copy to write (must not exist)")
    preset = get_preset("small")
    ap.add_argument("--recall", type=float, default=preset.selection_recall)
    ap.add_argument("--min-positives", type=int, default=preset.selection_min_positives)
    args = ap.parse_args()
    torch.set_num_threads(1)
    r = load_run(args.run)  # the exits come back centred (logit_offsets folded into their heads)
    config = r.config
    data = load_data(args.data, config["input"]["size"], seed=config["seed"])
    if data.class_ids != config["class_ids"]:
        raise SystemExit(f"{args.data} has other classes than the run {args.run}")
    preset = replace(preset, selection_recall=args.recall, selection_min_positives=args.min_positives)
    ctx = Ctx(spec=InputSpec(**config["input"]), preset=preset, env=DistEnv(), seed=config["seed"])
    last = r.exits[-1]
    after = r.exit_configs[-1].after_block
    tokens, _ = frozen_features(r.vit, data.calib.images, ctx, [after])
    with torch.no_grad():
        last.eval()
        scores = torch.sigmoid(last(tokens[after])).numpy()
    block = fit_class_recall(data.calib.Y, after, scores, preset)
    shutil.copytree(args.run, args.out)
    cal = json.loads((args.out / CALIBRATION).read_text())
    cal["policy"][CLASS_RECALL_KEY] = block.model_dump()
    (args.out / CALIBRATION).write_text(json.dumps(cal, indent=2))
    own = sum(n >= args.min_positives for n in data.calib.Y.sum(axis=0))
    print(
        f"{args.out}: recall {args.recall} cuts on the exit after block {after} for {own} of "
        f"{len(block.thresholds)} classes ({data.calib.name}, {len(data.calib.Y)} frames), pooled "
        f"{block.pooled:.4g}"
    )


if __name__ == "__main__":
    main()
