"""ONNX Runtime sessions and latency measurement the way the board runs them (CPU, 2 intra-op threads). Torch-free.

Timings on a shared machine are noisy, so comparisons alternate between the cases in blocks
(``interleaved_ms``) and report medians.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path | str, threads: int = 2, **opts: object) -> ort.InferenceSession:
    """A CPU ORT session with ``threads`` intra-op threads (the board's setting) and full graph optimization."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # ORT's warnings bypass logging; errors still raise
    for k, v in opts.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ms(
    sess: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    runs: int = 50,
    warmup: int = 5,
    run_options: ort.RunOptions | None = None,
) -> float:
    """Median wall time of ``sess.run`` over ``runs`` runs, in ms."""
    for _ in range(warmup):
        sess.run(None, feeds, run_options)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds, run_options)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_feeds(
    shapes: dict[str, tuple[int | str, ...]], rng: np.random.Generator, dims: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Random float32 inputs for a graph's input shapes; dynamic dims from ``dims`` (B=1, M=2 by default)."""
    dims = {"B": 1, "M": 2, **(dims or {})}
    return {
        k: rng.standard_normal([d if isinstance(d, int) else dims[d] for d in shape]).astype(np.float32)
        for k, shape in shapes.items()
    }


def interleaved_ms(
    cases: dict[str, tuple[ort.InferenceSession, dict[str, np.ndarray]]], runs: int = 50, blocks: int = 5
) -> dict[str, float]:
    """Median latency per case, timed in alternating blocks so background load hits every case alike."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(blocks):
        for k, (sess, feeds) in cases.items():
            times[k].append(latency_ms(sess, feeds, max(runs // blocks, 5), warmup=2))
    return {k: statistics.median(v) for k, v in times.items()}
