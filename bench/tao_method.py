"""The Polymorph claim on the tao profile: tables from ``train --recipe polymorph`` runs and ``eval --mode all``.

Reads each run's stage log (``stages.json``: the adapters stage's per-context rows and the recipe summary)
and, optionally, each seed's ``eval --json`` report; prints Markdown tables with mean ± std over the runs
(test split) and writes them as JSON. Usage:

    python bench/tao_method.py --runs RUN... [--evals EVAL_JSON...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("full", "early-exit", "polymorph", "switching", "merged")


def _ms(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    v = np.array([x for x in values if x is not None], dtype=float) * scale
    if not len(v):
        return "n/a"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"


def context_table(stage_logs: list[dict]) -> tuple[list[str], dict[str, Any]]:
    """Per context: classes, train frames, generalist / adapter / full-tail mAP on its classes (x100)."""
    rows = [s["stages"]["adapters"]["result"]["adapters"] for s in stage_logs]
    if any([r["classes"] for r in rs] != [r["classes"] for r in rows[0]] for rs in rows):
        raise SystemExit("the runs clustered different contexts; per-context rows cannot be paired")
    lines = [
        "| context | classes | train frames | generalist | adapter | full tail | adapter - generalist |",
        "|---|---|---|---|---|---|---|",
    ]
    gains, out = [], []
    for ci, first in enumerate(rows[0]):
        col = {k: [rs[ci].get(k) for rs in rows] for k in ("map_generalist", "map_adapter", "map_full_tail")}
        gain = [
            None if a is None or g is None else a - g
            for a, g in zip(col["map_adapter"], col["map_generalist"], strict=True)
        ]
        gains.append(gain)
        lines.append(
            f"| {ci} | {len(first['classes'])} | {first['train_frames']} | {_ms(col['map_generalist'])} | "
            f"{_ms(col['map_adapter'])} | {_ms(col['map_full_tail'])} | {_ms(gain)} |"
        )
        out.append({"context": ci, "classes": first["classes"], **col, "gain": gain})
    # the headline: per seed, the mean gain over contexts; then mean ± std over seeds
    per_seed = [float(np.nanmean([g[s] for g in gains if g[s] is not None])) for s in range(len(rows))]
    lines.append(
        f"\nmean over contexts of adapter - generalist (mAP x100, per seed then over seeds): {_ms(per_seed)}"
    )
    vs_full = [
        float(np.nanmean([rs[ci]["map_adapter"] - rs[ci]["map_full_tail"] for ci in range(len(rs))
                          if rs[ci]["map_adapter"] is not None and rs[ci]["map_full_tail"] is not None]))
        for rs in rows
    ]  # fmt: skip
    lines.append(f"mean over contexts of adapter - full tail: {_ms(vs_full)}")
    return lines, {"contexts": out, "gain_per_seed": per_seed, "vs_full_tail_per_seed": vs_full}


def overall_table(stage_logs: list[dict]) -> tuple[list[str], dict[str, Any]]:
    """All classes, all test frames: the LoRA generalist, every adapter on every frame, the full-tail model."""
    rec = [s["stages"]["adapters"]["result"]["recipe"] for s in stage_logs]
    lines = ["| model (all classes) | mAP | label F1 | exact match |", "|---|---|---|---|"]
    out = {}
    for name in ("generalist", "adapters_everywhere", "full_tail"):
        col = {k: [r[name].get(k) for r in rec] for k in ("map", "label_f1", "exact_match")}
        lines.append(f"| {name} | {_ms(col['map'])} | {_ms(col['label_f1'])} | {_ms(col['exact_match'])} |")
        out[name] = col
    per_adapter = rec[0].get("budget_per_adapter", rec[0].get("budget"))
    lines.append(f"\nbudget per adapter: {json.dumps(per_adapter)}")
    if "budget" in rec[0]["full_tail"]:
        lines.append(
            f"budget of the full-tail model (and the generalist): {json.dumps(rec[0]['full_tail']['budget'])}"
        )
    return lines, out


def eval_table(reports: list[dict]) -> tuple[list[str], dict[str, Any]]:
    lines = [
        "| mode | mAP | label F1 | adapters / tail frame | true contexts / tail frame | p50 ms | speed-up vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    out = {}
    for m in MODES:
        rows = [r["modes"][m] for r in reports if m in r["modes"]]
        if not rows:
            continue
        col = {
            "map": [r["map"] for r in rows],
            "label_f1": [r.get("label_f1") for r in rows],
            "adapters": [r.get("adapters_per_tail_frame") for r in rows],
            "needed": [r.get("true_contexts_per_tail_frame") for r in rows],
            "p50": [r["latency_ms"]["p50"] for r in rows],
            "speedup": [r.get("speedup_vs_full") for r in rows],
        }
        lines.append(
            f"| {m} | {_ms(col['map'])} | {_ms(col['label_f1'])} | {_ms(col['adapters'], 1)} | "
            f"{_ms(col['needed'], 1)} | {_ms(col['p50'], 1, 3)} | {_ms(col['speedup'], 1)} |"
        )
        out[m] = col
    return lines, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--evals", nargs="*", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logs = [json.loads((Path(r) / "stages.json").read_text()) for r in args.runs]
    result: dict[str, Any] = {"runs": args.runs}
    lines, result["per_context"] = context_table(logs)
    lines2, result["overall"] = overall_table(logs)
    print(f"## Adapters vs generalist on each context's classes ({len(logs)} seeds, test split, mAP x100)\n")
    print("\n".join(lines))
    print("\n## All classes\n")
    print("\n".join(lines2))
    if args.evals:
        reports = [json.loads(Path(e).read_text()) for e in args.evals]
        lines3, result["eval"] = eval_table(reports)
        print(f"\n## eval --mode all ({len(reports)} bundles, {reports[0]['split']} split)\n")
        print("\n".join(lines3))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
