"""The audio front end per frame, numpy vs ONNX Runtime, against the visual trunk of a bundle.

    python bench/audio_frontend.py --bundle /work/bundles/pre_s0 --out bench/results/audio_frontend.json

Times, per frame and in alternating blocks (the machine is shared and noisy; medians), the log-mel of one
window (``models/core/melspec.log_mel``, numpy) and the same computation exported to ONNX
(``models/nn/audio.MelFrontEnd``, ORT at 1 intra-op thread, as the engine runs on 2-core boards),
beside the bundle's visual trunk: every segment then the generalist tail for one frame (the `full` path).
The issue's target: the front end <= 10 % of the trunk's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from polymorphd.export.core.timing import session
from polymorphd.models.core.melspec import MelConfig, log_mel


def per_call_ms(fns: dict[str, Callable[[], object]], runs: int, blocks: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(blocks):
        for k, fn in fns.items():
            for _ in range(max(1, runs // blocks)):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from polymorphd.export.onnx import export_graph
    from polymorphd.export.plan import GraphSpec
    from polymorphd.models.nn.audio import MelFrontEnd

    torch.set_num_threads(1)
    mel = MelConfig()
    tmp = Path(tempfile.mkdtemp())
    spec = GraphSpec(
        "mel", MelFrontEnd(mel), ("audio",), ("mel",), {"audio": {0: "B"}},
        lambda b, g: {"audio": (torch.rand(b, mel.samples, generator=g) - 0.5) * 0.5},
    )  # fmt: skip
    export_graph(spec, tmp / "mel.onnx")
    mel_sess = session(tmp / "mel.onnx", threads=1)  # 1 intra-op thread: no pool, nothing spins
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    size = manifest["input"]["size"]
    trunk = [session(Path(args.bundle) / f, threads=1) for f in [*manifest["segments"], manifest["tail"]]]
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    window = np.random.default_rng(1).uniform(-0.3, 0.3, mel.samples).astype(np.float32)
    batch = window[None]

    def visual() -> None:
        x = trunk[0].run(None, {"image": image})[0]
        for s in trunk[1:]:
            x = s.run(None, {"tokens": x})[0]

    ms = per_call_ms(
        {
            "numpy": lambda: log_mel(window, mel),
            "onnx": lambda: mel_sess.run(None, {"audio": batch}),
            "visual_trunk": visual,
        },
        args.runs,
        args.blocks,
    )
    faster = min(("numpy", "onnx"), key=lambda k: ms[k])
    result = {
        "median_ms": ms,
        "ratio_to_trunk": {k: ms[k] / ms["visual_trunk"] for k in ("numpy", "onnx")},
        "kept": faster,
        "mel": mel.to_dict(),
        "bundle": str(args.bundle),
        "threads": 1,
        "note": "shared 2-core CPU, other jobs running; medians over alternating blocks",
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
