"""The per-exit table of a served bundle with audio exits: every visual and audiovisual exit's ONNX graph on
every frame of a split (not only the frames the cascade sends it), one bundle per seed.

    python bench/served_exits.py --bundles B0 B1 B2 --data /work/out14/data_av --out served.json
    python bench/served_exits.py --bundles B0 B1 B2 --data /work/data/default_big --calib-split validation \\
        --out served_big.json

Per exit: mAP on the split, the share of frames its calibrated rule answers (labels: the manifest's (lo, hi);
audiovisual exits also their count margin; ``exit_rate`` is both), count MAE (audiovisual exits), and per kind
the cascade (the first exit that answers, else the final) with its mean exit depth. With ``--calib-split``,
the exits' (lo, hi) and the class thresholds are calibrated again on that split of the same dataset
(``calibrate.calibrate_exit`` at the manifest's tolerance, the same code ``train`` uses; the count margins stay
the bundle's: it holds no final count head to calibrate them against), and the rates on the evaluated split
are given for that calibration too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from polymorphd.daemon.engine import load_engine
from polymorphd.daemon.graphs import Clock
from polymorphd.models.core.calibrate import calibrate_exit, decision_thresholds
from polymorphd.models.core.countrule import count_decides, count_mae
from polymorphd.models.core.exitrule import exit_decides
from polymorphd.models.core.melspec import log_mel
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import preprocess
from polymorphd.models.data.audio import split_windows
from polymorphd.models.data.tao import load_split

MIN_POSITIVES = 100  # the small preset's threshold_min_positives (models/train/presets.py)


def scores(engine, root: str, split_name: str) -> dict[str, Any]:
    """Every exit's (centred) probabilities, the audiovisual counts and the final's probabilities on every
    annotated frame of ``split_name``; the truth beside them."""
    split = load_split(root, split_name)
    frames = split.annotated_frames()
    tracks = split.audio_tracks()
    mel = log_mel(split_windows(tracks, frames, engine.mel.samples), engine.mel)
    t, clock = engine.trunk, Clock()
    n_exits = len(t.exits)
    vis = [[] for _ in range(n_exits)]
    av = [[] for _ in range(n_exits)]
    cnt = [[] for _ in range(n_exits)]
    final = []
    for i, f in enumerate(frames):
        x = preprocess(cv2.imread(str(f.path), cv2.IMREAD_COLOR), engine.spec)
        for s, seg in enumerate(t.segments):
            x = seg.run_all({seg.inputs[0]: x}, clock)[0]
            j = t.exit_after[s]
            if j is None:
                continue
            vis[j].append(t.exits[j].run({"tokens": x}, clock)[0])
            p, c = t.av_exits[j].run_all({"tokens": x, "mel": mel[i : i + 1]}, clock)
            av[j].append(p[0])
            cnt[j].append(float(c[0]))
        final.append(t.tail.run({"tokens": x}, clock)[0])
    ids = engine.class_ids
    return {
        "Y": split.multi_hot(frames, ids, ignore_unknown=True),
        "counts": np.array([f.count for f in frames], dtype=np.float64),
        "videos": np.array([f.video_id for f in frames]),
        "visual": [np.asarray(v, np.float64) for v in vis],
        "audiovisual": [np.asarray(v, np.float64) for v in av],
        "count": [np.asarray(c) for c in cnt],
        "final": np.asarray(final, np.float64),
    }


def _cascade(decided: list[np.ndarray], blocks: list[int], depth: int) -> dict[str, Any]:
    left = np.ones(len(decided[0]), dtype=bool)
    where = np.full(len(left), float(depth))
    shares = {}
    for d, b in zip(decided, blocks, strict=True):
        here = left & d
        shares[f"after {b}"] = float(here.mean())
        where[here] = b
        left &= ~here
    shares["final"] = float(left.mean())
    return {"shares": shares, "mean_depth": float(where.mean())}


def table_for(engine, ev: dict[str, Any], cal: dict[str, Any] | None, tolerance: float) -> dict[str, Any]:
    m = engine.base_manifest
    blocks = [int(e["after_block"]) for e in m["exits"]]
    depth = int(m["segment_blocks"][-1][1])
    vis_thr = [(e["threshold"]["lo"], e["threshold"]["hi"]) for e in m["exits"]]
    av_thr = [(e["threshold"]["lo"], e["threshold"]["hi"]) for e in m["audio"]["exits"]]
    margins = [float(e["count_margin"]) for e in m["audio"]["exits"]]
    rows: dict[str, Any] = {}
    decided: dict[str, dict[str, list[np.ndarray]]] = {"bundle": {}, "recalibrated": {}}
    for kind, thr in (("visual", vis_thr), ("audiovisual", av_thr)):
        for j, b in enumerate(blocks):
            P = ev[kind][j]
            lab = exit_decides(P, *thr[j])
            row = {"map": float(mean_average_precision(ev["Y"], P)[0]), "lo": thr[j][0], "hi": thr[j][1]}
            row["label_exit_rate"] = float(lab.mean())
            both = lab
            if kind == "audiovisual":
                cd = count_decides(ev["count"][j], margins[j])
                both = lab & cd
                row |= {"count_mae": count_mae(ev["count"][j], ev["counts"]), "count_margin": margins[j]}
                row["count_exit_rate"] = float(cd.mean())
            row["exit_rate"] = float(both.mean())
            decided["bundle"].setdefault(kind, []).append(both)
            if cal is not None:
                cthr = decision_thresholds(cal["Y"], cal["final"], min_positives=MIN_POSITIVES)
                lo, hi, _ = calibrate_exit(
                    cal[kind][j], cal["final"], cal["Y"], cthr,
                    tolerance=tolerance, groups=cal["videos"], centred=True,
                )  # fmt: skip
                rl = exit_decides(P, lo, hi)
                rb = rl & count_decides(ev["count"][j], margins[j]) if kind == "audiovisual" else rl
                row["recalibrated"] = {
                    "lo": float(lo), "hi": float(hi), "label_exit_rate": float(rl.mean()),
                    "exit_rate": float(rb.mean()),
                }  # fmt: skip
                decided["recalibrated"].setdefault(kind, []).append(rb)
            rows[f"{kind}@{b}"] = row
    out: dict[str, Any] = {
        "exits": rows,
        "final": {"map": float(mean_average_precision(ev["Y"], ev["final"])[0])},
        "frames": len(ev["Y"]),
    }
    for calname, dec in decided.items():
        if dec:
            out[f"cascade_{calname}"] = {k: _cascade(v, blocks, depth) for k, v in dec.items()}
    return out


def summary(results: list[dict[str, Any]]) -> str:
    def ms(vals: list[float | None], pct: bool = False) -> str:
        v = [x for x in vals if x is not None]
        if not v:
            return ""
        s = 100.0 if pct else 1.0
        d = 1 if pct else 3
        return f"{s * np.mean(v):.{d}f} ± {s * np.std(v):.{d}f}"

    first = results[0]
    rows = [
        "| exit | mAP | exit rate (bundle) | exit rate (recalibrated) | count MAE |",
        "|---|---|---|---|---|",
    ]
    for name in first["exits"]:
        e = [r["exits"][name] for r in results]
        rec = [x.get("recalibrated", {}).get("exit_rate") for x in e]
        rows.append(
            f"| {name} | {ms([x['map'] for x in e])} | {ms([x['exit_rate'] for x in e], True)} % | "
            f"{ms(rec, True) + ' %' if any(r is not None for r in rec) else ''} | "
            f"{ms([x.get('count_mae') for x in e])} |"
        )
    rows.append(f"| final | {ms([r['final']['map'] for r in results])} | | | |")
    for key in ("cascade_bundle", "cascade_recalibrated"):
        if key in first:
            for kind in first[key]:
                d = ms([r[key][kind]["mean_depth"] for r in results])
                rows.append(f"- {key.split('_')[1]} calibration, {kind} cascade: mean exit depth {d} blocks")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="+", required=True, help="full bundles with audio exits, one per seed")
    ap.add_argument("--data", required=True, help="a dataset with sound ('polymorphd data synth --audio')")
    ap.add_argument("--split", default="test", help="the split the table is measured on")
    ap.add_argument("--calib-split", default=None, help="also calibrate (lo, hi) on this split of --data")
    ap.add_argument("--tolerance", type=float, default=0.01, help="calibration tolerance (the preset's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for b in args.bundles:
        engine = load_engine(b, threads=args.threads)
        if engine.mel is None:
            raise SystemExit(f"{b}: the bundle has no audio exits (export a run trained with --audio)")
        ev = scores(engine, args.data, args.split)
        cal = scores(engine, args.data, args.calib_split) if args.calib_split else None
        res = table_for(engine, ev, cal, args.tolerance) | {"bundle": b, "split": args.split}
        res["calib_split"] = args.calib_split
        results.append(res)
        print(f"{b}: " + ", ".join(f"{k} {v['map']:.3f}" for k, v in res["exits"].items()), flush=True)
    text = summary(results)
    print(f"{args.data} [{args.split}], {len(results)} bundle(s), mean ± std:\n{text}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "bundles": results, "table": text}, indent=1)
        )


if __name__ == "__main__":
    main()
