"""The tiny synthetic TAO dataset that eval and bench stream (class ids match the tiny run)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """2 validation videos x 6 frames of 48x40, every other frame annotated; class ids match the tiny run."""
    from polymorphd.models.data.synth import SynthConfig, write_dataset

    cfg = SynthConfig(num_classes=10, num_contexts=3, width=48, height=40, frames_per_video=6, max_objects=2,
                      sources=("glyph",))  # fmt: skip
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny", cfg, videos=(0, 2, 0), annotate_every=2,
                         progress=False)  # fmt: skip
