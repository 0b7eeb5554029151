"""Audiovisual and count exits on a frozen tiny backbone: data with audio, training, the measured table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polymorphd.models.core.melspec import MelConfig  # noqa: E402
from polymorphd.models.core.preprocess import InputSpec  # noqa: E402
from polymorphd.models.data.soundscape import AudioConfig  # noqa: E402
from polymorphd.models.data.synth import SynthConfig, write_dataset  # noqa: E402
from polymorphd.models.nn.vit import VisionTransformer  # noqa: E402
from polymorphd.models.train import avexits  # noqa: E402
from polymorphd.models.train.distributed import DistEnv  # noqa: E402
from polymorphd.models.train.loop import Ctx  # noqa: E402
from polymorphd.models.train.presets import get_preset  # noqa: E402
from polymorphd.models.train.train import load_data  # noqa: E402

DATA = SynthConfig(
    num_classes=8, num_contexts=2, width=32, height=32, frames_per_video=8, hubs=1, hub_contexts=2,
    scene_length=(4, 8),
)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_dataset(
        tmp_path_factory.mktemp("av") / "d", DATA, (2, 2, 1), progress=False, audio=AudioConfig()
    )
    return load_data(root, 32, audio=MelConfig())


def test_load_data_with_audio_gives_every_frame_its_log_mel_and_count(data):
    for split in (data.train, data.calib, data.report):
        assert split.mel.shape == (len(split.Y), 32, 32) and split.mel.dtype == np.float32
        assert split.counts.shape == (len(split.Y),) and (split.counts >= split.Y.sum(1)).all()
    assert np.isfinite(data.train.mel).all() and data.train.mel.std() > 0


def test_train_and_measure_visual_and_audiovisual_exits(data):
    preset = get_preset("tiny")
    preset = replace(preset, exits=replace(preset.exits, epochs=1))
    torch.manual_seed(0)
    vit = VisionTransformer(preset.vit_config(len(data.class_ids)))
    ctx = Ctx(InputSpec(preset.img_size), preset, DistEnv(), 0, False)
    exits, final = avexits.train(vit, data.train, ctx, MelConfig(), views=1)
    assert sorted(exits) == ["audiovisual@1", "audiovisual@2", "visual@1", "visual@2"]
    assert exits["audiovisual@1"].audio is not None and exits["visual@1"].audio is None
    pc = avexits.predict(vit, exits, final, data.calib, ctx)
    pr = avexits.predict(vit, exits, final, data.report, ctx)
    assert set(pr) == set(exits) | {"final", "audiovisual@1|silenced", "audiovisual@2|silenced"}
    res = avexits.measure(data.calib, data.report, pc, pr, ctx)
    for row in res["exits"].values():
        assert 0.0 <= row["exit_rate"] <= min(row["label_exit_rate"], row["count_exit_rate"]) <= 1.0
        assert row["count_mae"] >= 0.0
    for kind in ("visual", "audiovisual"):
        shares = res["cascade"][kind]["shares"]
        assert sum(shares.values()) == pytest.approx(1.0) and len(shares) == 3
        assert 1.0 <= res["cascade"][kind]["mean_depth"] <= preset.depth
    s = avexits.summarise([res, res])
    assert s["final"]["count_mae"] == [pytest.approx(res["final"]["count_mae"]), 0.0]


def test_audiovisual_training_needs_audio(data):
    preset = get_preset("tiny")
    ctx = Ctx(InputSpec(preset.img_size), preset, DistEnv(), 0, False)
    vit = VisionTransformer(preset.vit_config(len(data.class_ids)))
    with pytest.raises(ValueError, match="need the split's log-mel windows and counts"):
        avexits.train(vit, replace(data.train, mel=None), ctx, MelConfig(), views=0)
