from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest

from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.data import backgrounds, sprites, synth, tao
from polymorphd.models.data.synth import SynthConfig

# Tiny but faithful: 12 classes in 3 contexts, 64x64 frames.
SMALL = SynthConfig(
    num_classes=12, num_contexts=3, width=64, height=64, frames_per_video=24, scene_length=(12, 24)
)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_loader_round_trips_what_write_dataset_writes(tmp_path: Path) -> None:
    out = synth.write_dataset(tmp_path / "ds", SMALL, videos=(2, 1, 1), progress=False)
    assert tao.available_splits(out) == ["train", "validation", "test"]
    ids = synth.category_ids(SMALL)
    assert ids == [1000 + 7 * k for k in range(12)]  # sparse, not 0..K-1
    video_seed = 0
    for split_name, n in (("train", 2), ("validation", 1), ("test", 1)):
        split = tao.load_split(out, split_name)
        assert [c.name for c in split.categories] == synth.class_names(SMALL)
        assert [c.id for c in split.categories] == ids
        assert len(split.videos) == n
        for video in split.videos:
            truth = list(synth.render_video(SMALL, video_seed))
            video_seed += 1
            assert [f.frame_index for f in video.frames] == list(range(SMALL.frames_per_video))
            got = split.multi_hot(video.frames, ids)
            want = np.zeros_like(got)
            for i, fr in enumerate(truth):
                want[i, list(fr.labels)] = 1
            np.testing.assert_array_equal(got, want)
            images = tao.load_images(video.frames, 64)
            diff = np.abs(images.astype(int) - np.stack([f.image for f in truth]).astype(int))
            assert diff.mean() < 3.0  # JPEG q95
    doc = json.loads((out / "annotations" / "train.json").read_text())
    image_ids = [im["id"] for im in doc["images"]]
    assert image_ids != sorted(image_ids)  # shuffled, as TAO's is unordered
    assert doc["info"]["contexts"] == [[ids[k] for k in g] for g in synth.context_groups(SMALL)]


def test_annotations_boxes_and_tracks_are_consistent(tmp_path: Path) -> None:
    out = synth.write_dataset(tmp_path / "ds", SMALL, videos=(2, 0, 0), annotate_every=5, progress=False)
    assert tao.available_splits(out) == ["train"]  # a split with 0 videos is not written
    doc = json.loads((out / "annotations" / "train.json").read_text())
    assert len(doc["images"]) == 2 * len(range(0, SMALL.frames_per_video, 5))
    assert all(im["frame_index"] % 5 == 0 for im in doc["images"])
    assert len(list((out / "frames" / "train").rglob("*.jpg"))) == 2 * SMALL.frames_per_video  # all written
    tracks = {t["id"]: t for t in doc["tracks"]}
    images = {im["id"]: im for im in doc["images"]}
    for a in doc["annotations"]:
        t = tracks[a["track_id"]]
        assert t["category_id"] == a["category_id"] and t["video_id"] == images[a["image_id"]]["video_id"]
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert max(w, h) >= 0.2 * 64  # large enough to recognise at a 64x64 model input
    whole = tao.load_split(out, "train", include_unannotated=True)
    assert [f.frame_index for f in whole.frames()] == list(range(SMALL.frames_per_video)) * 2
    assert sum(f.labels is not None for f in whole.frames()) == len(doc["images"])


def test_generator_label_statistics_match_the_config() -> None:
    cfg = SynthConfig(
        num_classes=24, num_contexts=4, width=64, height=64, frames_per_video=60,
        min_objects=1, max_objects=3, scene_length=(30, 60), seed=3,
    )  # fmt: skip
    videos = [list(synth.render_video(cfg, s)) for s in range(12)]
    stats = synth.label_statistics([[f.labels for f in v] for v in videos], synth.context_groups(cfg))
    assert stats.frames == 720
    assert (stats.min_labels, stats.max_labels) == (1, 3)
    assert 1.6 < stats.mean_labels < 2.4  # sparsity: ~2 of 24 classes
    assert stats.persistence > 0.9  # continuity: long scenes, rare entries/exits
    assert stats.within_context > 0.8  # co-occurrence concentrated within context groups
    # Scenes last at least scene_length[0] frames (or to the end of the video).
    for v in videos:
        cuts = [i for i in range(1, len(v)) if v[i].scene != v[i - 1].scene]
        assert all(b - a >= 30 for a, b in zip([0, *cuts], cuts, strict=False))
    busy = SynthConfig(
        num_classes=24,
        num_contexts=2,
        width=64,
        height=64,
        frames_per_video=40,
        min_objects=2,
        max_objects=5,
        change_prob=0.2,
    )
    counts = {len(f.labels) for s in range(4) for f in synth.render_video(busy, s)}
    assert min(counts) >= 2 and max(counts) <= 5 and len(counts) >= 3
    noisy = SynthConfig(num_classes=24, num_contexts=4, width=64, height=64, outside_prob=1.0, min_objects=2)
    noisy_stats = synth.label_statistics(
        [[f.labels for f in synth.render_video(noisy, s)] for s in range(4)], synth.context_groups(noisy)
    )
    assert noisy_stats.within_context < stats.within_context  # outside_prob really draws outside the context


def test_context_groups_overlap_a_little_and_share_hubs() -> None:
    cfg = SynthConfig(num_classes=32, num_contexts=6, hubs=2, hub_contexts=3, overlap=1)
    groups = synth.context_groups(cfg)
    assert len(groups) == 6
    assert set().union(*map(set, groups)) == set(range(32))
    assert all(len(g) >= cfg.max_objects for g in groups)
    membership = np.bincount([c for g in groups for c in g], minlength=32)
    assert (membership == 3).sum() == 2  # the hubs
    assert membership.max() <= 3 and (membership == 1).sum() >= 32 - 2 - 6
    assert synth.context_groups(cfg) == groups
    assert synth.context_groups(SynthConfig(num_classes=32, num_contexts=6, seed=1)) != groups


def test_same_config_and_seed_give_identical_bytes(tmp_path: Path) -> None:
    a = _tree_digest(synth.write_dataset(tmp_path / "a", SMALL, videos=(1, 1, 0), progress=False))
    b = _tree_digest(synth.write_dataset(tmp_path / "b", SMALL, videos=(1, 1, 0), progress=False))
    assert a == b
    other = replace(SMALL, seed=1)
    c = _tree_digest(synth.write_dataset(tmp_path / "c", other, videos=(1, 1, 0), progress=False))
    assert c.keys() == a.keys() and c != a
    x, y = list(synth.render_video(SMALL, 4)), list(synth.render_video(SMALL, 4))
    assert all(np.array_equal(f.image, g.image) and f.labels == g.labels for f, g in zip(x, y, strict=True))


@pytest.fixture
def no_real_images(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fashion-mnist absent and scikit-learn not importable; caches cleared around the test."""
    monkeypatch.setattr(sprites, "FASHION_MNIST_DIR", tmp_path / "no-fashion-mnist")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    sprites.build_bank.cache_clear()
    sprites.load_digits.cache_clear()
    yield
    sprites.build_bank.cache_clear()


def test_glyph_fallback_without_fashion_mnist_or_sklearn(no_real_images: None, tmp_path: Path) -> None:
    cfg = SynthConfig(num_classes=40, num_contexts=4, width=64, height=64, frames_per_video=6)
    names = synth.class_names(cfg)
    assert len(names) == 40 and all(n.startswith("glyph/") for n in names)
    assert names[:3] == ["glyph/circle", "glyph/square", "glyph/triangle"] and "glyph/K" in names
    frames = list(synth.render_video(cfg, 0))
    assert len(frames) == 6 and frames[0].image.shape == (64, 64, 3) and frames[0].labels
    with pytest.raises(
        ConfigError, match=r"num_classes=50 but only 43 classes are available .*fmnist, digit not installed"
    ):
        synth.class_names(SynthConfig(num_classes=50))


def test_real_sources_come_first_when_installed() -> None:
    if not (sprites.fmnist_available() and sprites.digits_available()):
        pytest.skip("fashion-mnist or scikit-learn not installed")
    names = synth.class_names(SynthConfig(num_classes=63, num_contexts=6))
    assert (
        names[:2] == ["fmnist/tshirt", "fmnist/trouser"]
        and names[10] == "digit/0"
        and names[20] == "glyph/circle"
    )
    bank = sprites.build_bank(21)
    assert len(bank.exemplars[0]) > 100 and bank.exemplars[0].shape[1:] == (sprites.EXEMPLAR_SIZE,) * 2
    assert not bank.exemplars[0].flags.writeable  # shared by every caller: must stay read-only


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 500}, "num_classes"),
        ({"width": 8}, "width"),
        ({"max_objects": 1, "min_objects": 2}, "min_objects"),
        ({"scene_length": (10, 5)}, "scene_length"),
        ({"scene_length": (1.5, 5)}, "scene_length"),
        ({"object_size": (0.3, 0.9)}, "object_size"),
        ({"change_prob": 1.5}, "change_prob"),
        ({"max_speed": 0.0}, "max_speed"),
        ({"sources": ("imagenet",)}, "sources"),
        ({"num_classes": 12, "num_contexts": 8}, "num_contexts"),
        ({"hub_contexts": 0}, "hub_contexts"),
        ({"num_classes": 6, "num_contexts": 1, "hubs": 0, "max_objects": 7}, "num_contexts"),
        ({"frames_per_video": 2.5}, "frames_per_video"),
    ],
)
def test_config_validation_names_the_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"SynthConfig\.{field} must be"):
        SynthConfig(**kwargs)


def test_write_dataset_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="videos must be three counts"):
        synth.write_dataset(tmp_path / "a", SMALL, videos=(1, 1), progress=False)
    with pytest.raises(ConfigError, match="annotate_every must be an integer >= 1, got 0"):
        synth.write_dataset(tmp_path / "a", SMALL, annotate_every=0, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(DataError, match=r"full: output exists and is not an empty directory"):
        synth.write_dataset(tmp_path / "full", SMALL, progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_video_background(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 48))
    assert writer.isOpened()
    for i in range(20):
        writer.write(np.full((48, 96, 3), (10 * i, 80, 200), np.uint8))
    writer.release()
    cfg = replace(SMALL, background=str(path))
    frames = list(synth.render_video(cfg, 0))
    assert frames[0].image.shape == (64, 64, 3)
    red = np.median([f.image[..., 2] for f in frames])  # objects cover a small part of the frame
    assert abs(red - 200 * backgrounds.VIDEO_DIM) < 8  # the footage, dimmed, behind the objects
    blue = np.median([f.image[..., 0] for f in frames], axis=(1, 2))
    assert len(set(blue.tolist())) > 5  # it plays
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"bad\.mp4: cannot open background video"):
        synth.SynthStream(SynthConfig(background=str(bad)))


def test_stream_goes_video_after_video() -> None:
    cfg = replace(SMALL, frames_per_video=5)
    stream = synth.SynthStream(cfg, seed=2)
    assert stream.class_names == synth.class_names(cfg)
    frames = list(islice(stream, 12))
    assert [f.frame_index for f in frames] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    again = list(islice(synth.SynthStream(cfg, seed=2), 12))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, again, strict=True))
    other = next(iter(synth.SynthStream(cfg, seed=3)))
    assert not np.array_equal(other.image, frames[0].image)


def test_cli_synth_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polymorphd.daemon.cli import main

    argv = ["data", "synth", "--out", str(tmp_path / "ds"), "--classes", "12", "--contexts", "3",
            "--videos", "2", "1", "0", "--frames", "10", "--size", "64", "48", "--annotate-every", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "classes: 12 (" in out and "contexts: 3" in out
    assert "30 written, 15 annotated (train 10, validation 5)" in out
    assert "persistence" in out and "within a context" in out
    split = tao.load_split(tmp_path / "ds", "train")
    assert cv2.imread(str(split.frames()[0].path)).shape == (48, 64, 3)
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err
