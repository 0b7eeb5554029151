"""The adapter tail's cost against the generalist tail, on one bundle, in one process (ratios, not absolutes).

Times ``tail.onnx`` (the generalist's tail) and ``tail_lora.onnx`` with M = 1..max_m stacked adapter rows on
the same trunk tokens, interleaved round by round so machine noise hits every path alike; reports medians and
the ratio of each to the generalist tail. Usage:

    python bench/tail_profile.py BUNDLE [--runs 300] [--threads 1] [--max-m 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from polymorphd.daemon.adapters import read_adapter_file as read_tensors
from polymorphd.export.core.manifest import load_manifest
from polymorphd.export.core.timing import session


def measure(bundle: Path, runs: int, threads: int, max_m: int) -> dict:
    m = load_manifest(bundle)
    tail, lora = session(bundle / m.tail, threads), session(bundle / m.tail_lora, threads)
    tokens = np.random.default_rng(0).standard_normal((1, m.model["num_tokens"], m.model["embed_dim"]))
    tokens = tokens.astype(np.float32)
    files = [read_tensors(bundle / a.file) for a in m.adapters[:max_m]]
    feeds = {
        k: {"tokens": tokens, **{n: np.concatenate([f[n] for f in files[:k]]) for n in files[0]}}
        for k in range(1, len(files) + 1)
    }
    paths = {"tail": lambda: tail.run(None, {"tokens": tokens})}
    for k, feed in feeds.items():
        paths[f"tail_lora M={k}"] = lambda feed=feed: lora.run(None, feed)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(10):
        for fn in paths.values():
            fn()
    for _ in range(runs):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t))
    med = {p: float(np.median(v)) for p, v in times.items()}
    return {
        "bundle": str(bundle), "runs": runs, "threads": threads, "median_ms": med,
        "ratio_to_tail": {p: v / med["tail"] for p, v in med.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-m", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = measure(Path(a.bundle), a.runs, a.threads, a.max_m)
    print("| path | median ms | vs generalist tail |\n|---|---|---|")
    for p, v in res["median_ms"].items():
        print(f"| {p} | {v:.4f} | {res['ratio_to_tail'][p]:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
