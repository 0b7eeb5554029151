"""The policy's selection against what the frames need, from ``polymorphd eval --json`` reports, mean ± std
over seeds: one row per named group of reports (one report per seed). Usage:

    python bench/selection_table.py NAME=GLOB [NAME=GLOB ...] [--mode polymorph] [--json OUT]

Columns (eval's ``_selection``): adapters per frame the final classifier answered and the contexts those
frames' true labels need (their ratio per seed: the issue's target is <= 1.3), the share of those labels the
chosen contexts hold, the same two counts over the frames that ran adapters (round one's measure), and mAP /
label F1 (x100) over all annotated frames.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = (
    ("adapters / final frame", lambda m: m.get("adapters_per_final_frame"), 1.0),
    ("true contexts / final frame", lambda m: m.get("true_contexts_per_final_frame"), 1.0),
    ("ratio", lambda m: _ratio(m, "adapters_per_final_frame", "true_contexts_per_final_frame"), 1.0),
    ("label coverage %", lambda m: m.get("label_coverage"), 100.0),
    ("adapters / tail frame", lambda m: m.get("adapters_per_tail_frame"), 1.0),
    ("true contexts / tail frame", lambda m: m.get("true_contexts_per_tail_frame"), 1.0),
    ("final frames %", lambda m: m.get("final_frames", 0) / max(1, m.get("annotated_frames", 0)), 100.0),
    ("mAP", lambda m: m.get("map"), 100.0),
    ("label F1", lambda m: m.get("label_f1"), 100.0),
)


def _ratio(m: dict[str, Any], a: str, b: str) -> float | None:
    return m[a] / m[b] if m.get(a) is not None and m.get(b) else None


def _ms(values: list[float | None], scale: float) -> str:
    v = np.array([x for x in values if x is not None], dtype=np.float64) * scale
    if not v.size:
        return "n/a"
    n = f" (n={v.size})" if v.size < len(values) else ""
    return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}{n}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="+", help="NAME=GLOB of eval --json reports, one per seed")
    ap.add_argument("--mode", default="polymorph")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    print("| policy | seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    out: dict[str, Any] = {}
    for group in args.groups:
        name, _, pattern = group.partition("=")
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"{name}: no report matches {pattern}")
        rows = []
        for f in files:
            doc = json.loads(Path(f).read_text())
            rows.append(doc["modes"][args.mode] | {"annotated_frames": doc["annotated_frames"]})
        cells = {c: [get(m) for m in rows] for c, get, _ in COLUMNS}
        print(f"| {name} | {len(files)} | " + " | ".join(_ms(cells[c], s) for c, _, s in COLUMNS) + " |")
        out[name] = {"files": files} | cells
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
