"""Warm-started adapters at a fair budget, on a finished ``train --recipe polymorph`` run (nothing retrained but
the adapters and the generalist's continuation; the run is only read).

Each context's adapter starts from the generalist's LoRA and head (``recipe.generalist_lora``: epoch 0 is
the generalist, kept when no epoch beats it on the calibration split); the generalist trains on for the
adapters' total budget from its own weights, so both sides have spent the same. Writes the stage's rows and
summary as JSON; ``--table`` prints the per-context table over several such JSONs beside the run's own
(cold-start) adapter rows. Usage:

    python bench/tao_warm.py --run RUN --data DIR --out OUT.json
    python bench/tao_warm.py --table OUT_s0.json OUT_s1.json ... --runs RUN_s0 RUN_s1 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.train import recipe
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx
from polymorphd.models.train.presets import get_preset
from polymorphd.models.train.run import STAGE_LOG, load_run
from polymorphd.models.train.train import load_data


def warm(run_dir: Path, data_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    r = load_run(run_dir)
    if r.adapter_base is None:
        raise SystemExit(f"{run_dir} is not a --recipe polymorph run (no adapter_base.pt)")
    cfg = r.config
    preset = recipe.recipe_preset(get_preset(cfg["preset"]))
    saved = cfg["preset_config"]
    for key in ("adapters", "lora_last_blocks", "negative_ratio", "lora_rank", "lora_alpha"):
        want = preset.to_dict()[key]
        if json.loads(json.dumps(want)) != saved[key]:
            raise SystemExit(f"{run_dir}: preset {key} {saved[key]} differs from today's recipe {want}")
    data = load_data(data_dir, cfg["input"]["size"], seed=cfg["seed"])
    ctx = Ctx(spec=InputSpec(**cfg["input"]), preset=preset, env=DistEnv(), seed=cfg["seed"], progress=False)
    _, res = recipe.train_adapters(
        r.adapter_base, r.vit, r.contexts, data.train, data.calib, data.report, ctx,
        full_tail=False, warm_start=True,
    )  # fmt: skip
    out.write_text(json.dumps({"run": str(run_dir), **res}, indent=2))
    print(f"wrote {out}")


def _ms(v: list[float | None]) -> str:
    """mean ± std x100 of the values known (a context with no test positive has no mAP)."""
    a = np.array([x for x in v if x is not None and np.isfinite(x)], dtype=np.float64) * 100
    if not a.size:
        return "n/a"
    return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table(outs: list[Path], runs: list[Path]) -> None:
    warm_rows = [json.loads(p.read_text())["adapters"] for p in outs]
    cold_rows = [
        json.loads((r / STAGE_LOG).read_text())["stages"]["adapters"]["result"]["adapters"] for r in runs
    ]
    cols = {
        "generalist": ("map_generalist", warm_rows),
        "generalist continued": ("map_generalist_continued", warm_rows),
        "cold adapter (round one)": ("map_adapter", cold_rows),
        "warm adapter": ("map_adapter", warm_rows),
    }
    print("| context | classes | " + " | ".join(cols) + " | warm - continued | warm kept epoch 0 |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    gains: dict[str, list[float]] = {"warm - continued": [], "warm - generalist": [], "cold - generalist": []}
    per_seed = {k: [[] for _ in outs] for k in gains}
    for i, first in enumerate(warm_rows[0]):
        cells = [_ms([rows[i][key] for rows in src]) for key, src in cols.values()]
        d = [_diff(w[i]["map_adapter"], w[i]["map_generalist_continued"]) for w in warm_rows]
        kept = sum(w[i]["best_epoch"] == 0 for w in warm_rows)
        print(
            f"| {i} | {len(first['classes'])} | " + " | ".join(cells) + f" | {_ms(d)} | {kept}/{len(outs)} |"
        )
        for s, (w, c) in enumerate(zip(warm_rows, cold_rows, strict=True)):
            per_seed["warm - continued"][s].append(
                _diff(w[i]["map_adapter"], w[i]["map_generalist_continued"])
            )
            per_seed["warm - generalist"][s].append(_diff(w[i]["map_adapter"], w[i]["map_generalist"]))
            per_seed["cold - generalist"][s].append(_diff(c[i]["map_adapter"], c[i]["map_generalist"]))
    print()
    print("| mean over contexts, per seed, then mean ± std over seeds | mAP x100 |")
    print("|---|---|")
    for k, seeds in per_seed.items():
        print(f"| {k} | {_ms([float(np.mean([x for x in s if x is not None])) for s in seeds])} |")
    print()
    summaries = [json.loads(p.read_text())["recipe"] for p in outs]
    print("| all classes (report split) | mAP | label F1 |")
    print("|---|---|---|")
    for k in ("generalist", "generalist_continued", "adapters_everywhere"):
        print(
            f"| {k} | {_ms([s[k]['map'] for s in summaries])} | {_ms([s[k]['label_f1'] for s in summaries])} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", nargs="+", type=Path)
    ap.add_argument("--runs", nargs="+", type=Path)
    a = ap.parse_args(argv)
    if a.table:
        table(a.table, a.runs)
    else:
        warm(a.run, a.data, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
