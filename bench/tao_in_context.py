"""Adapters vs generalist on the frames each adapter would actually serve: the tao profile's true scene contexts.

Training's per-context table scores an adapter on its classes over every test frame, most of which come from
other scenes. The runtime runs an adapter only when the policy picks its context; this script scores, from a
bundle (ONNX Runtime, torch-free), each clustered context's adapter and the generalist tail on that context's
classes over (a) every annotated test frame and (b) the frames whose true scene context (the profile's
per-image ``context``) is the one the clustered context overlaps most. Usage:

    python bench/tao_in_context.py --bundles B... --data TAO_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from polymorphd.daemon.adapters import read_adapter_file
from polymorphd.export.core.manifest import load_manifest
from polymorphd.export.core.timing import session
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec, preprocess_batch
from polymorphd.models.data import tao


def scores(bundle: Path, data: Path) -> dict:
    m = load_manifest(bundle)
    split = tao.load_split(data, "test")
    frames = split.annotated_frames()
    doc = json.loads((data / "annotations" / "test.json").read_text())
    scene = {im["id"]: im["context"] for im in doc["images"]}
    truth_ctx = np.array([scene[f.image_id] for f in frames])
    truth_groups = [set(map(m.class_ids.index, g)) for g in doc["info"]["contexts"]]
    Y = split.multi_hot(frames, m.class_ids)
    x = preprocess_batch(tao.load_images(frames, m.input["size"]), InputSpec(**m.input))
    for f in m.segments:
        sess = session(bundle / f, 1)
        x = np.concatenate(
            [sess.run(None, {sess.get_inputs()[0].name: x[i : i + 64]})[0] for i in range(0, len(x), 64)]
        )
    tail = session(bundle / m.tail, 1)
    gen = np.concatenate([tail.run(None, {"tokens": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    lora = session(bundle / m.tail_lora, 1)
    rows = []
    for ctx, ad in zip(m.contexts, m.adapters, strict=True):
        feed = read_adapter_file(bundle / ad.file)
        probs = np.concatenate([lora.run(None, {"tokens": x[i : i + 1], **feed})[0] for i in range(len(x))])
        cls = list(ctx.classes)
        best = max(range(len(truth_groups)), key=lambda g: len(truth_groups[g] & set(cls)))
        own = truth_ctx == best
        row = {"context": ctx.id, "classes": cls, "true_context": best, "own_frames": int(own.sum())}
        for name, mask in (("all", np.ones(len(Y), bool)), ("own", own)):
            row[f"generalist_{name}"] = mean_average_precision(Y[mask][:, cls], gen[mask][:, cls])[0]
            row[f"adapter_{name}"] = mean_average_precision(Y[mask][:, cls], probs[mask][:, cls])[0]
        rows.append(row)
    return {"bundle": str(bundle), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="+", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = [scores(Path(b), Path(a.data)) for b in a.bundles]
    print("| context | own frames | generalist (all) | adapter (all) | generalist (own) | adapter (own) |")
    print("|---|---|---|---|---|---|")
    gains = {"all": [], "own": []}
    for i, first in enumerate(res[0]["rows"]):
        cells = []
        for key in ("generalist_all", "adapter_all", "generalist_own", "adapter_own"):
            v = np.array([r["rows"][i][key] for r in res]) * 100
            cells.append(f"{np.nanmean(v):.2f} ± {np.nanstd(v, ddof=1) if len(v) > 1 else 0:.2f}")
        print(f"| {first['context']} | {first['own_frames']} | " + " | ".join(cells) + " |")
    for name in gains:
        per_bundle = [
            np.nanmean([r[f"adapter_{name}"] - r[f"generalist_{name}"] for r in b["rows"]]) * 100 for b in res
        ]
        sd = np.std(per_bundle, ddof=1) if len(per_bundle) > 1 else 0.0
        print(
            f"\nmean adapter - generalist over contexts, {name} frames: {np.mean(per_bundle):+.2f} ± {sd:.2f}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
