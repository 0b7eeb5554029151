"""Micro-benchmark of ``Engine.infer`` on a tiny exported bundle, one row per mode (``make bench``).

The bundle is tiny (32x32 input, 4 blocks), so these rows measure the engine's own per-frame cost around
ONNX Runtime (session calls, policy, merging) more than the model; ``polymorphd bench`` measures real bundles.
One ORT thread, so the rows compare on a shared machine.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from polymorphd.models.core.modes import MODES

pytest.importorskip("onnxruntime")


@pytest.mark.benchmark(group="engine infer (tiny bundle)")
@pytest.mark.parametrize("mode", MODES)
def test_engine_infer(benchmark, tiny_bundle, mode) -> None:
    from polymorphd.daemon.engine import load_engine

    engine = load_engine(tiny_bundle, mode=mode, threads=1)
    frames = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    state = engine.new_state()
    cycle = iter(itertools.cycle(frames))
    answered: list[str] = []

    def infer() -> None:
        answered.append(str(engine.infer(next(cycle), state).exit))

    try:
        benchmark(infer)
    finally:
        engine.close()
    # where frames were answered: exits of the random tiny model rarely decide, so most reach the tail
    benchmark.extra_info["exits"] = {k: answered.count(k) for k in sorted(set(answered))}
