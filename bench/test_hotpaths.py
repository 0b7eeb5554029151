"""Micro-benchmarks of the daemon's per-frame numpy paths (pytest-benchmark; ``make bench``).

Each benchmark times one frame's worth of work on in-memory inputs, except ``mean_average_precision``,
which scores a whole stream as eval and training do. No timing assertions: read the table.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from polymorphd.daemon.policy import ContextPolicy
from polymorphd.models.core.exitrule import exit_decides
from polymorphd.models.core.knobs import PolicyKnobs
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec, preprocess


@pytest.mark.benchmark(group="preprocess")
@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("camera", [(480, 640), (1080, 1920)], ids=["480p", "1080p"])
def test_preprocess_a_camera_frame(benchmark, camera, size) -> None:
    """Resize + normalise into the engine's reused input buffer (what ``Engine.infer`` does per frame)."""
    frame = np.random.default_rng(0).integers(0, 256, (*camera, 3), dtype=np.uint8)
    spec = InputSpec(size=size)
    out = np.empty((1, 3, size, size), dtype=np.float32)
    benchmark(preprocess, frame, spec, out)


@pytest.mark.benchmark(group="exit rule")
def test_exit_decides_one_frame(benchmark, stream) -> None:
    probs = iter(itertools.cycle(stream.P))
    benchmark(lambda: exit_decides(next(probs), 0.1, 0.9))


@pytest.mark.benchmark(group="context policy")
def test_policy_select_and_observe(benchmark, stream) -> None:
    """The policy's whole per-frame bookkeeping: choose adapters from the exit, then record the labels."""
    policy = ContextPolicy(stream.contexts, stream.Y.shape[1], PolicyKnobs())
    state = policy.new_state()
    frames = iter(itertools.cycle(zip(stream.P, stream.Y.astype(bool), strict=True)))

    def frame() -> list[int]:
        p, labels = next(frames)
        chosen = policy.select(state, p)
        policy.observe(state, labels)
        return chosen

    benchmark(frame)


@pytest.mark.benchmark(group="context policy")
@pytest.mark.parametrize("adapters", [1, 2, 4])
def test_policy_merge(benchmark, stream, adapters) -> None:
    """Scores of ``adapters`` adapter rows merged into the exit's (the chosen set's plan is cached)."""
    policy = ContextPolicy(stream.contexts, stream.Y.shape[1], PolicyKnobs(max_adapters=adapters))
    chosen = list(range(adapters))
    rows = np.random.default_rng(1).random((adapters, stream.Y.shape[1]), dtype=np.float32)
    benchmark(policy.merge, stream.P[0], rows, chosen)


@pytest.mark.benchmark(group="metrics")
def test_mean_average_precision_of_a_stream(benchmark, stream) -> None:
    """(2000 frames, 100 classes): one evaluation's mAP."""
    value, _ = benchmark(mean_average_precision, stream.Y, stream.P)
    benchmark.extra_info["map"] = round(value, 4)
