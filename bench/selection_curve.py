"""How tight can the likely-label set be? The last exit's per-class recall cuts, fit on the validation split
at several recall targets, measured on the test split, uncapped (no ``max_adapters``), from a bundle (ONNX
Runtime, torch-free).

Per target: likely classes per frame, the contexts needed to cover them (greedy cover, no cap) against the
contexts the frame's true labels need, and the share of true labels in the likely set (its recall). The
single ``recall_threshold`` (0.2) is the first row. This separates what the selection rule can do from what
the exit's scores allow: if the exit ranks absent classes above present ones, no cut is both tight and
complete. Usage:

    python bench/selection_curve.py --bundles B... --data DIR [--targets 0.5 0.7 0.8 0.9 0.95] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from polymorphd.export.core.manifest import load_manifest
from polymorphd.export.core.timing import session
from polymorphd.models.core.calibrate import recall_thresholds
from polymorphd.models.core.contexts import greedy_cover
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec, preprocess_batch
from polymorphd.models.data import tao

MIN_POSITIVES = 20  # as the small preset's selection_min_positives


def _batched(sess, name: str, x: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(None, {name: x[i : i + 64]})[0] for i in range(0, len(x), 64)])


def last_exit_scores(bundle: Path, data: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(Y, P): the split's annotated frames' labels and the last exit's (centred) scores; the contexts."""
    m = load_manifest(bundle)
    s = tao.load_split(data, split)
    frames = s.annotated_frames()
    Y = s.multi_hot(frames, m.class_ids).astype(bool)
    x = preprocess_batch(tao.load_images(frames, m.input["size"]), InputSpec(**m.input))
    last = m.exits[-1]
    for f, (_, end) in zip(m.segments, m.segment_blocks, strict=True):
        sess = session(bundle / f, 1)
        x = _batched(sess, sess.get_inputs()[0].name, x)
        if end == last.after_block:
            break
    P = _batched(session(bundle / last.file, 1), "tokens", x)
    return Y, P, [list(c.classes) for c in m.contexts]


def measure(
    labels: np.ndarray, scores: np.ndarray, cuts: np.ndarray | float, contexts: list[list[int]]
) -> dict:
    likely = scores > cuts
    need = [len(greedy_cover(np.flatnonzero(y).tolist(), contexts)) for y in labels]
    cover = [len(greedy_cover(np.flatnonzero(lk).tolist(), contexts)) for lk in likely]
    n_true = labels.sum()
    return {
        "likely_classes": float(likely.sum(axis=1).mean()),
        "likely_contexts": float(np.mean(cover)),
        "true_contexts": float(np.mean(need)),
        "label_recall": float((likely & labels).sum() / n_true) if n_true else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="+", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows: dict[str, list[dict]] = {}
    for b in a.bundles:
        Yv, Pv, contexts = last_exit_scores(Path(b), Path(a.data), "validation")
        Yt, Pt, _ = last_exit_scores(Path(b), Path(a.data), "test")
        exit_map = mean_average_precision(Yt, Pt)[0]
        rows.setdefault("single 0.2", []).append(measure(Yt, Pt, 0.2, contexts) | {"exit_map": exit_map})
        for t in a.targets:
            cuts, _ = recall_thresholds(Yv, Pv, recall=t, min_positives=MIN_POSITIVES)
            rows.setdefault(f"recall {t:g}", []).append(
                measure(Yt, Pt, cuts, contexts) | {"exit_map": exit_map}
            )
    keys = ("likely_classes", "likely_contexts", "true_contexts", "label_recall", "exit_map")
    print("| cut | " + " | ".join(keys) + " | likely / true contexts |")
    print("|---|" + "---|" * (len(keys) + 1))
    for name, rs in rows.items():
        cells = []
        for k in (*keys, "ratio"):
            v = np.array(
                [r["likely_contexts"] / r["true_contexts"] if k == "ratio" else r[k] for r in rs], dtype=float
            )
            v = v * (100 if k in ("label_recall", "exit_map") else 1)
            cells.append(f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
