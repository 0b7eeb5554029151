"""``polymorphd pretrain``: a tiny corpus, its checkpoint and record, and the round trip through --init-from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polymorphd.models.core.errors import ConfigError  # noqa: E402
from polymorphd.models.data import sprites  # noqa: E402
from polymorphd.models.data.synth import SynthConfig, class_names, write_dataset  # noqa: E402
from polymorphd.models.nn.checkpoint import checkpoint_stem, read_checkpoint  # noqa: E402
from polymorphd.models.train import pretrain as pt  # noqa: E402
from polymorphd.models.train.presets import Schedule, get_preset  # noqa: E402
from polymorphd.models.train.train import train  # noqa: E402

CORPUS = pt.CorpusConfig(classes=12, videos=8, frames=3, heldout=2, size=48, seed=1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> pt.PretrainResult:
    out = tmp_path_factory.mktemp("pretrain") / "tiny.pt"
    return pt.pretrain(out, get_preset("tiny"), CORPUS, Schedule(epochs=2, lr=2e-3, batch_size=8),
                       seed=0, progress=False, command="polymorphd pretrain --test")  # fmt: skip


def test_corpus_classes_are_disjoint_from_the_default_dataset() -> None:
    default = set(class_names(SynthConfig()))
    corpus = set(sprites.available_class_names(("proc",)))
    assert len(corpus) >= 256 and not default & corpus
    bank = sprites.build_bank(3, ("proc",))
    assert [e.shape[1:] for e in bank.exemplars] == [(sprites.EXEMPLAR_SIZE,) * 2] * 3
    assert not np.array_equal(bank.exemplars[0][0], bank.exemplars[1][0])  # classes look different


def test_render_corpus_labels_match_boxes_at_input_size() -> None:
    data = pt.render_corpus(CORPUS, 32, range(3), progress=False)
    assert data.images.shape == (9, 32, 32, 3) and data.Y.shape == (9, 12)
    for y, b in zip(data.Y, data.boxes, strict=True):
        assert set(np.flatnonzero(y)) == set(b[:, 0].astype(int))
        assert (b[:, 1:] >= 0).all() and (b[:, 1:] <= 32).all()


def test_checkpoint_and_record(pretrained) -> None:
    ck, rec = pretrained.checkpoint, pretrained.record
    assert json.loads(ck.with_suffix(".json").read_text()) == rec
    assert rec["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert rec["command"] == "polymorphd pretrain --test" and rec["corpus"]["classes"] == 12
    assert 0.0 <= rec["heldout_map"] <= 1.0 and rec["seconds"]["total"] > 0
    assert read_checkpoint(ck).format == "polymorphd" and checkpoint_stem(ck) == "conv"


def test_train_init_from_the_checkpoint_keeps_its_stem_and_trunk(pretrained, tmp_path) -> None:
    data = write_dataset(tmp_path / "d", SynthConfig(num_classes=6, num_contexts=2, width=32, height=32,
                         frames_per_video=6, hubs=1, hub_contexts=2, scene_length=(3, 6)),
                         videos=(2, 1, 1), progress=False)  # fmt: skip
    preset = get_preset("tiny", epochs=1)
    res = train(data, tmp_path / "run", preset, init_from=str(pretrained.checkpoint), progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["vit"]["stem"] == "conv" and cfg["init_from"] == str(pretrained.checkpoint)
    notes = json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]["generalist"]["result"]
    assert any(
        "head re-initialised: checkpoint has 12 classes, the model needs 6" in n for n in notes["init_notes"]
    )
    assert res.report["generalist"]["map"] is not None


def test_resolve_init_from(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pt, "PRETRAINED_DIR", tmp_path)
    assert pt.resolve_init_from(None, "small") is None  # nothing shipped: from scratch
    (tmp_path / "small.pt").write_bytes(b"x")
    assert pt.resolve_init_from(None, "small") == str(tmp_path / "small.pt")
    assert pt.resolve_init_from("none", "small") is None
    assert pt.resolve_init_from(str(tmp_path / "small.pt"), "base") == str(tmp_path / "small.pt")
    with pytest.raises(ConfigError, match=r"--init-from .*nope\.pt does not exist; .* or 'none'"):
        pt.resolve_init_from(str(tmp_path / "nope.pt"), "small")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes must be in 2..512"),
        ({"videos": 4, "heldout": 4}, "1 <= heldout < videos"),
        ({"frames": 0}, "frames per video must be >= 1"),
    ],
)
def test_corpus_config_names_the_bad_value(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        pt.CorpusConfig(**kwargs)


def test_out_must_be_a_pt_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"ending in \.pt"):
        pt.pretrain(
            tmp_path / "x.bin", get_preset("tiny"), CORPUS, Schedule(epochs=1, lr=1e-3), progress=False
        )


def test_procedural_classes_are_identical_in_every_process() -> None:
    from polymorphd.models.data import procedural

    assert all(np.array_equal(a, b) for a, b in zip(procedural.render(5), procedural.render(5), strict=True))
    with pytest.raises(ValueError, match="procedural class 512 does not exist"):
        procedural.render(512)


@pytest.mark.parametrize("name", ["small", "base"])
def test_shipped_checkpoint_fits_its_preset_and_records_its_hash(name) -> None:
    shipped = pt.shipped_checkpoint(name)
    assert shipped is not None, f"models/pretrained/{name}.pt is not shipped"
    rec = json.loads(Path(shipped).with_suffix(".json").read_text())
    assert rec["sha256"] == hashlib.sha256(Path(shipped).read_bytes()).hexdigest()
    preset = get_preset(name)
    geometry = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
    assert [rec["vit"][k] for k in geometry] == [getattr(preset, k) for k in geometry]
    assert checkpoint_stem(shipped) == preset.stem
