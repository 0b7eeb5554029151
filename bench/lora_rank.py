"""LoRA rank ablation runs for ``polymorphd bench --runs``: an existing run's adapters retrained at another rank.

Copies RUN (backbone, exits, contexts and their stage records) to OUT with the LoRA rank changed (alpha scaled
with it, so alpha / rank, LoRA's scale, stays the run's), drops the adapter and calibration stages, and resumes
training: only the adapters (and the calibration after them) are trained, with the run's seed, so the rank is
the only difference. Needs torch.

    .venv/bin/python bench/lora_rank.py --run /work/runs/pre_s0 --data /work/data/default --rank 8 \\
        --out /work/out12/rank8_s0
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.train import train

KEEP = ("backbone.pt", "exits.pt", "contexts.json", "config.json", "stages.json")


def retrain_adapters(run: Path, data: Path, rank: int, out: Path) -> Path:
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new --out")
    config = json.loads((run / "config.json").read_text())
    scale = config["lora"]["alpha"] / config["lora"]["rank"]
    out.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(run / name, out / name)
    config["lora"] |= {"rank": rank, "alpha": scale * rank}
    config["preset_config"] |= {"lora_rank": rank, "lora_alpha": scale * rank}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log = json.loads((out / "stages.json").read_text())
    for stage in ("adapters", "calibration"):
        log["stages"].pop(stage, None)
    (out / "stages.json").write_text(json.dumps(log, indent=2) + "\n")
    preset = replace(get_preset(config["preset"]), lora_rank=rank, lora_alpha=scale * rank)
    train(data, out, preset, seed=config["seed"], init_from=config["init_from"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--rank", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    print(f"wrote {retrain_adapters(a.run, a.data, a.rank, a.out)}")


if __name__ == "__main__":
    main()
