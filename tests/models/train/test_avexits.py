"""Audiovisual and count exits on a frozen tiny backbone: data with audio, training, the measured table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polymorphd.models.core.melspec import LOG_FLOOR, MelConfig  # noqa: E402
from polymorphd.models.core.preprocess import InputSpec  # noqa: E402
from polymorphd.models.data.soundscape import AudioConfig  # noqa: E402
from polymorphd.models.data.synth import SynthConfig, write_dataset  # noqa: E402
from polymorphd.models.nn.vit import VisionTransformer  # noqa: E402
from polymorphd.models.train import avexits  # noqa: E402
from polymorphd.models.train.distributed import DistEnv  # noqa: E402
from polymorphd.models.train.loop import Batches, Ctx, SplitData  # noqa: E402
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
    assert {e.count_grad for e in exits.values()} == {avexits.COUNT_GRAD} and 0.0 < avexits.COUNT_GRAD < 1.0
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


def _two_frames_with_sound() -> SplitData:
    """Frame 0: an 8x8-pixel class-0 object (at 32 px: 16x16), silent; frame 1: a small class-1 object and a
    loud tone in mel band 5. Counts 1 and 1."""
    frames = np.full((2, 32, 32, 3), 10, dtype=np.uint8)
    frames[1] = 20
    frames[0, 0:16, 0:16] = 50
    frames[1, 8:16, 8:16] = 200
    boxes = [np.array([[0, 0, 0, 16, 16]], np.float32), np.array([[1, 8, 8, 16, 16]], np.float32)]
    mel = np.full((2, 32, 32), np.log(LOG_FLOOR), dtype=np.float32)
    mel[1, 5] = 3.0
    Y = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    return SplitData("train", frames, Y, np.array([0, 1]), boxes, np.ones(2, np.float32), mel)


def _ctx(**augment) -> Ctx:
    p = get_preset("tiny")
    p = replace(p, augment=replace(p.augment, **augment))
    return Ctx(InputSpec(p.img_size), p, DistEnv(), 0, False)


def test_a_pasted_object_brings_its_sound_and_the_count_follows_the_boxes():
    data, idx = _two_frames_with_sound(), torch.arange(2)
    ctx = _ctx(paste=1.0, mixup_alpha=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # paste, no crop, no mixup
    for seed in range(5):
        v = Batches(data, ctx, seed).view(idx)
        # frame 0 got frame 1's object: it now hears frame 1's tone, and counts its own object and the pasted one
        assert v.mel[0, 5].numpy() == pytest.approx(np.full(32, 3.0), abs=1e-4)
        assert v.mel[0, 6].numpy() == pytest.approx(np.full(32, np.log(LOG_FLOOR)), abs=1e-4)
        assert v.count[0] == 2 and v.y[0].tolist() == [1.0, 1.0]
        # frame 1 then got an object of frame 0 as it is now (its sound holds the tone): the tone doubles
        assert v.mel[1, 5].numpy() == pytest.approx(np.full(32, 3.0 + np.log(2.0)), abs=1e-4)
        if v.y[1, 0] == 1:  # it got frame 0's own object: its object counts only while it is still visible
            assert v.count[1] == 1 + v.y[1, 1]
        else:  # it got the class-1 object frame 0 had received, which may hide its own
            assert v.count[1] in (1, 2)
        x, y, tok = Batches(data, ctx, seed)(idx)  # __call__ is the same view (same random draws)
        assert torch.equal(x, v.x) and torch.equal(y, v.y) and tok is None
    plain = Batches(replace(data, mel=None), ctx, 0).view(idx)
    assert plain.mel is None and plain.count is None


def test_mixup_blends_sound_and_count_with_the_labels_weight():
    data = replace(_two_frames_with_sound(), counts=np.array([1.0, 3.0], np.float32))
    ctx = _ctx(paste=0.0, mixup_alpha=0.4, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # no crop: labels stay
    mixed = 0
    for seed in range(8):
        v = Batches(data, ctx, seed).view(torch.arange(2))
        for i in range(2):
            lam = float(v.y[i, 0]) if i == 0 else float(v.y[i, 1])  # weight of the frame's own labels
            own, other = data.counts[i], data.counts[1 - i]
            assert float(v.count[i]) == pytest.approx(lam * own + (1 - lam) * other, abs=1e-5)
            want = lam * data.mel[i, 5] + (1 - lam) * data.mel[1 - i, 5]
            assert v.mel[i, 5].numpy() == pytest.approx(want, abs=1e-4)
            mixed += 0.01 < lam < 0.99
    assert mixed > 0  # some draws did blend two frames


def test_exit_views_carry_augmented_targets_and_bad_augment_is_named(data):
    preset = get_preset("tiny")
    vit = VisionTransformer(preset.vit_config(len(data.class_ids)))
    ctx = Ctx(InputSpec(preset.img_size), preset, DistEnv(), 0, False)
    n = len(data.train.Y)
    cache = avexits.features(vit, data.train, ctx, [1], views=1, augment="exits")
    assert cache["Y"].shape == (2 * n, len(data.class_ids)) and cache["mel"].shape == (2 * n, 32, 32)
    assert torch.equal(cache["Y"][:n], torch.from_numpy(data.train.Y).float())  # the clean frames first
    assert torch.equal(cache["counts"][:n], torch.from_numpy(data.train.counts))
    assert not torch.equal(cache["counts"][n:], cache["counts"][:n])  # paste, crop and mixup moved counts
    plain = avexits.features(vit, data.train, ctx, [1], views=1, augment="plain")
    assert torch.equal(plain["counts"][n:], plain["counts"][:n])  # crop/flip/colour keep the clean targets
    with pytest.raises(ValueError, match="augment must be one of exits, plain"):
        avexits.features(vit, data.train, ctx, [1], augment="mixup")
