"""Inputs for the micro-benchmarks (``make bench``): a realistic label stream and a tiny exported bundle.

Sizes follow the method benchmark (``polymorphd data synth --profile tao``: >= 100 long-tailed classes,
>= 10 contexts), so the per-frame numbers are those of a real deployment's numpy side. The bundle is the
test suite's tiny random run (``tests/conftest.py:make_tiny_run``), exported once per session.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

NUM_CLASSES = 100
NUM_CONTEXTS = 12
FRAMES = 2000  # about a minute of video at 30 fps, or a TAO validation split's annotated frames
SCENE_FRAMES = 30  # label sets persist for about a second (temporal continuity)


@dataclass(frozen=True)
class Stream:
    """A video's worth of frames: contexts over the classes, labels per frame and an exit's noisy scores."""

    contexts: list[list[int]]
    Y: np.ndarray  # (FRAMES, NUM_CLASSES) uint8: 1-4 labels per scene, drawn from one or two contexts
    P: np.ndarray  # (FRAMES, NUM_CLASSES) float32 exit probabilities: high on the labels, noisy elsewhere


def make_stream(seed: int = 0) -> Stream:
    rng = np.random.default_rng(seed)
    classes = rng.permutation(NUM_CLASSES)
    contexts = [sorted(c.tolist()) for c in np.array_split(classes, NUM_CONTEXTS)]
    for i in range(0, NUM_CONTEXTS, 3):  # some classes belong to two contexts (hubs), as clustering gives
        contexts[i].append(contexts[(i + 1) % NUM_CONTEXTS][0])
    Y = np.zeros((FRAMES, NUM_CLASSES), dtype=np.uint8)
    for start in range(0, FRAMES, SCENE_FRAMES):
        pool = [
            c for k in rng.choice(NUM_CONTEXTS, size=rng.integers(1, 3), replace=False) for c in contexts[k]
        ]
        Y[start : start + SCENE_FRAMES, rng.choice(pool, size=rng.integers(1, 5), replace=False)] = 1
    noise = rng.beta(0.5, 6.0, size=Y.shape)  # mostly near 0, a long tail of false alarms
    P = np.clip(np.where(Y == 1, rng.uniform(0.4, 1.0, size=Y.shape), noise), 0.0, 1.0).astype(np.float32)
    return Stream(contexts, Y, P)


@pytest.fixture(scope="session")
def stream() -> Stream:
    return make_stream()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An fp32 bundle of the tests' tiny random run (32x32 input, 4 blocks, 2 exits, 3 adapters, 10 classes)."""
    pytest.importorskip("torch")
    export = pytest.importorskip("polymorphd.export.bundle")
    if str(ROOT) not in sys.path:  # the tests package is not installed; reuse its run builder, don't copy it
        sys.path.insert(0, str(ROOT))
    from tests.conftest import make_tiny_run

    run = make_tiny_run(tmp_path_factory.mktemp("run") / "tiny")
    return export.export_bundle(
        run, tmp_path_factory.mktemp("bundles") / "tiny", bench_runs=3, progress=False
    )
