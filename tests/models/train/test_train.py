"""``polymorphd train`` end to end on a tiny synthetic dataset: run format, report, resume, frozen base."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polymorphd.daemon.cli import main as cli_main  # noqa: E402
from polymorphd.models.core.errors import ConfigError  # noqa: E402
from polymorphd.models.core.preprocess import InputSpec, preprocess_batch  # noqa: E402
from polymorphd.models.data.synth import SynthConfig, write_dataset  # noqa: E402
from polymorphd.models.train import stages  # noqa: E402
from polymorphd.models.train.augment import Geometry, augment_batch, augment_geometry, mixup, to_input  # noqa: E402
from polymorphd.models.train.boxaug import move_boxes, paste_objects, patch_targets  # noqa: E402
from polymorphd.models.train.presets import PRESETS, Augment, get_preset  # noqa: E402
from polymorphd.models.train.run import load_run  # noqa: E402
from polymorphd.models.train.train import STAGES, _summary, generalist_labels, load_data, train  # noqa: E402

TINY_DATA = SynthConfig(
    num_classes=8, num_contexts=2, width=32, height=32, frames_per_video=12, hubs=1, hub_contexts=2,
    scene_length=(6, 12),
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(
        tmp_path_factory.mktemp("data") / "synth", TINY_DATA, videos=(4, 2, 2), progress=False
    )


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return out, train(dataset, out, get_preset("tiny"), seed=3, progress=False)


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def test_run_directory_loads_and_matches_the_preset(run) -> None:
    out, res = run
    assert res.ran == list(STAGES) and res.skipped == []
    r = load_run(out)
    preset = get_preset("tiny")
    assert r.vit_config.depth == preset.depth and r.vit_config.num_classes == TINY_DATA.num_classes
    assert [e.after_block for e in r.exit_configs] == list(preset.exit_after)
    assert all(e.kind == "slvit" for e in r.exit_configs)
    assert len(r.adapters) == len(r.contexts) >= 1
    assert r.config["class_ids"] == [1000 + 7 * i for i in range(8)]  # the dataset's sparse ids, in order
    assert r.config["input"] == InputSpec(size=32).to_dict()
    cal = r.calibration
    assert len(cal["class_thresholds"]) == 8 and len(cal["exits"]) == 2
    assert all(0.0 <= e["lo"] <= e["hi"] <= 1.0 for e in cal["exits"])
    assert cal["policy"]["max_adapters"] >= 1
    # the policy's per-class recall cuts, fit on the last exit's calibration scores
    cr = cal["policy"]["class_recall"]
    assert cr["version"] == 1 and cr["exit_after_block"] == r.exit_configs[-1].after_block
    assert cr["target"] == preset.selection_recall and len(cr["thresholds"]) == 8
    assert all(0.0 <= t <= 1.0 for t in cr["thresholds"])
    # every class reachable through some context
    assert set().union(*map(set, r.contexts)) == set(range(8))


def test_a_finished_run_holds_exactly_the_layouts_files(run) -> None:
    from polymorphd.models.train.run import FILES

    assert sorted(p.name for p in run[0].iterdir()) == sorted(FILES)


def test_report_fields_are_present_and_numeric(run) -> None:
    out, res = run
    rep = json.loads((out / "report.json").read_text())
    assert rep == json.loads(json.dumps(res.report))
    assert _numeric(rep["generalist"]["map"]) and 0.0 <= rep["generalist"]["map"] <= 1.0
    for k in ("label_f1", "exact_match"):  # beside mAP, for the generalist and every exit variant
        assert _numeric(rep["generalist"][k]) and 0.0 <= rep["generalist"][k] <= 1.0
        assert all(_numeric(e[k]) and 0.0 <= e[k] <= 1.0 for e in rep["exits"])
    assert "'test' split" in rep["label_definition"] and "'validation' split" in rep["label_definition"]
    assert len(rep["exits"]) == 2 * 4  # two positions x {slvit, mlp} x {copycat, not}
    combos = {(e["after_block"], e["kind"], e["copycat"]) for e in rep["exits"]}
    assert combos == {(b, k, c) for b in (1, 2) for k in ("slvit", "mlp") for c in (True, False)}
    for e in rep["exits"]:
        assert _numeric(e["map"]) and _numeric(e["gflops"]) and _numeric(e["params"])
        assert e["gflops"] < rep["gflops"]["trunk_block"]  # an exit costs less than one block
        # the clean training frames plus one augmented view of each (tiny's exit_views)
        assert e["train_samples"] == 2 * rep["splits"]["train"]["frames"]
    assert rep["contexts"] and all(isinstance(c, list) for c in rep["contexts"])
    assert set(rep["coverage"]) == {"1", "2", "3"} and all(_numeric(v) for v in rep["coverage"].values())
    assert len(rep["adapters"]) == len(rep["contexts"])
    for a in rep["adapters"]:
        assert {"context", "map_generalist", "map_adapter"} <= set(a)
        assert a["map_adapter"] is None or _numeric(a["map_adapter"])
    assert any(_numeric(a["map_adapter"]) for a in rep["adapters"])
    assert all(_numeric(rep["gflops"][k]) for k in ("trunk_block", "tail_block", "full"))
    assert rep["gflops"]["tail_block"] > rep["gflops"]["trunk_block"]  # LoRA deltas cost a little
    assert "'test'" in rep["map_definition"] and "macro" in rep["map_definition"]
    assert set(STAGES) <= set(rep["timings"]) and all(_numeric(v) for v in rep["timings"].values())
    md = (out / "report.md").read_text()
    assert "| after block | kind | copycat | mAP | label F1 | exact match |" in md and "## Wall time" in md
    assert "| mAP (report) | label F1 (report) | exact match (report) |" in md
    g = rep["generalist"]
    assert f"| {g['map']:.4f} | {g['label_f1']:.4f} | {g['exact_match']:.4f} |" in md
    assert rep["label_definition"] in md
    summary = "\n".join(_summary(rep, out))
    assert f"label F1 {g['label_f1']:.4f}, exact match {g['exact_match']:.4f} (test)" in summary


def test_report_label_quality_is_that_of_the_thresholded_predictions(run, dataset) -> None:
    """Generalist: its labels at the calibrated class thresholds (the manifest's); each deployed exit: its
    labels at its own decision thresholds fit on the calibration split; both scored on the test split."""
    from polymorphd.models.core.calibrate import decision_thresholds
    from polymorphd.models.core.metrics import label_quality
    from polymorphd.models.nn.exits import build_exit
    from polymorphd.models.train.distributed import DistEnv
    from polymorphd.models.train.loop import Ctx, frozen_features, predict

    out, res = run
    r, preset = load_run(out), get_preset("tiny")
    data = load_data(dataset, preset.img_size)
    assert (data.calib.name, data.report.name) == ("validation", "test")
    ctx = Ctx(spec=InputSpec(size=preset.img_size), preset=preset, env=DistEnv(), seed=3, progress=False)
    thresholds = np.asarray(r.calibration["class_thresholds"])
    probs = predict(r.vit, data.report.images, ctx)
    want = label_quality(probs > thresholds, data.report.Y)
    assert {k: res.report["generalist"][k] for k in want} == pytest.approx(want)
    # the tiny generalist's scores barely move, so also check the thresholds are the ones given: halfway
    # through each class's range, the label sets differ from frame to frame
    job = SimpleNamespace(vit=r.vit, data=data, ctx=ctx)
    mid = (probs.min(axis=0) + probs.max(axis=0)) / 2
    got = generalist_labels(job, {"class_thresholds": mid.tolist()})
    assert got == pytest.approx(label_quality(probs > mid, data.report.Y))
    assert got != generalist_labels(job, {"class_thresholds": [0.5] * len(mid)})
    raw_states = torch.load(out / "exits.pt", weights_only=True)
    deployed = [e for e in res.report["exits"] if e["kind"] == "slvit" and e["copycat"]]
    assert len(deployed) == len(r.exit_configs) == 2
    for ec, state, reported in zip(r.exit_configs, raw_states, deployed, strict=True):
        assert reported["after_block"] == ec.after_block
        m = build_exit(r.vit.cfg, ec).eval()
        m.load_state_dict(state)  # uncentred: its own thresholds, as the report measures it
        probs = {}
        for split in (data.calib, data.report):
            tokens = frozen_features(r.vit, split.images, ctx, [ec.after_block])[0][ec.after_block]
            with torch.no_grad():
                probs[split.name] = torch.sigmoid(m(tokens)).numpy().astype(np.float64)
        t = decision_thresholds(
            data.calib.Y, probs["validation"], min_positives=preset.threshold_min_positives
        )
        want = label_quality(probs["test"] > t, data.report.Y)
        assert {k: reported[k] for k in want} == pytest.approx(want)


def test_exit_labels_are_scored_at_the_exits_own_thresholds() -> None:
    # class 0 is present where the exit scores 0.3 on calibration frames, absent at 0.1: its own threshold
    # lies between, far below 0.5; on report frames 0.25 must count as present and 0.05 as absent
    calib_truth = np.array([[1], [1], [1], [0], [0], [0]], dtype=np.uint8)
    calib_probs = np.array([[0.3], [0.32], [0.28], [0.1], [0.12], [0.08]])
    truth = np.array([[1], [0], [1], [0]], dtype=np.uint8)
    probs = np.array([[0.25], [0.05], [0.26], [0.45]])  # the last frame is a false positive
    got = stages.labels_at_own_thresholds(calib_truth, calib_probs, truth, probs, min_positives=3)
    assert got == pytest.approx(
        {"label_f1": 0.75, "exact_match": 0.75}
    )  # per frame F1: 1, 1 (both empty), 1, 0
    empty = stages.labels_at_own_thresholds(calib_truth, calib_probs, truth[:0], probs[:0], min_positives=3)
    assert empty == {"label_f1": None, "exact_match": None}  # JSON-ready: no frames, no number


def test_exit_views_carry_the_teachers_answer_on_each_view_and_respect_the_memory_cap(
    run, dataset, monkeypatch
) -> None:
    from polymorphd.models.train.distributed import DistEnv
    from polymorphd.models.train.loop import Ctx, frozen_features

    r = load_run(run[0])
    preset = replace(get_preset("tiny"), exit_views=3)
    data = load_data(dataset, preset.img_size)
    ctx = Ctx(spec=InputSpec(size=preset.img_size), preset=preset, env=DistEnv(), seed=0, progress=False)
    n = len(data.train.Y)
    tokens, Y, teacher = stages.exit_training_set(r.vit, data.train, ctx, [1, 2])
    assert len(Y) == len(teacher) == 4 * n and {b: len(t) for b, t in tokens.items()} == {1: 4 * n, 2: 4 * n}
    clean, final = frozen_features(r.vit, data.train.images, ctx, [1], final=True)
    assert torch.equal(tokens[1][:n], clean[1]) and np.allclose(teacher[:n].numpy(), final)
    assert torch.equal(Y[:n], torch.from_numpy(data.train.Y).float())
    # augmented views differ from the clean frames, and the teacher answers each view
    assert not torch.allclose(tokens[1][n : 2 * n], clean[1])
    logits = r.vit.forward_head(r.vit.forward_blocks(tokens[2][n:], 2, preset.depth))
    assert torch.allclose(teacher[n:], torch.sigmoid(logits), atol=1e-5)
    # room for the clean frames and one view only: the views are cut, not the memory budget
    per_frame = sum(t[0].numel() * t.element_size() for t in clean.values()) * 2  # two positions
    monkeypatch.setattr(stages, "EXIT_CACHE_BYTES", 2 * n * per_frame)
    _, Y, _ = stages.exit_training_set(r.vit, data.train, ctx, [1, 2])
    assert len(Y) == 2 * n


def test_deployed_exits_are_centred_on_their_own_class_thresholds(run, dataset) -> None:
    from polymorphd.models.nn.exits import build_exit

    out, _ = run
    r = load_run(out)
    raw_states = torch.load(out / "exits.pt", weights_only=True)
    x = torch.randn(5, r.vit.cfg.num_tokens, r.vit.cfg.embed_dim)
    for i, (ec, m) in enumerate(zip(r.exit_configs, r.exits, strict=True)):
        offsets = r.calibration["exits"][i]["logit_offsets"]
        assert len(offsets) == TINY_DATA.num_classes
        raw = build_exit(r.vit.cfg, ec).eval()
        raw.load_state_dict(raw_states[i])
        with torch.no_grad():
            assert torch.allclose(m(x), raw(x) - torch.tensor(offsets), atol=1e-5)
    # centring moves each class's threshold t to p = 0.5
    t = np.array([0.05, 0.3, 0.5, 0.9])
    p = np.array([[0.04, 0.31, 0.49, 0.95], [0.06, 0.29, 0.51, 0.85]])
    centred = 1 / (1 + np.exp(stages.logit_offsets(t) - np.log(p / (1 - p))))
    assert ((centred > 0.5) == (p > t)).all()


def test_calibration_on_few_videos_warns_and_names_the_fix(run, dataset, caplog) -> None:
    from polymorphd.models.train.distributed import DistEnv
    from polymorphd.models.train.loop import Ctx

    out, _ = run
    r = load_run(out)
    calib = load_data(dataset, 32, progress=False).calib
    ctx = Ctx(InputSpec(32), get_preset("tiny"), DistEnv(), 0, False)
    with caplog.at_level("WARNING", logger="polymorphd.models.train.stages"):
        stages.calibrate(r.vit, r.exits, calib, ctx)
    assert f"calibration split validation has {calib.videos} videos" in caplog.text
    assert f"aim for {stages.FEW_CALIBRATION_VIDEOS} or more" in caplog.text
    caplog.clear()
    reps = -(-stages.FEW_CALIBRATION_VIDEOS // len(calib.Y))  # enough frames to give each its own video
    many = replace(
        calib, images=np.concatenate([calib.images] * reps), Y=np.concatenate([calib.Y] * reps),
        video_ids=np.arange(reps * len(calib.Y)),
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="polymorphd.models.train.stages"):
        stages.calibrate(r.vit, r.exits, many, ctx)
    assert "videos: thresholds" not in caplog.text


def test_best_epoch_selection_reads_the_first_calibration_videos() -> None:
    from polymorphd.models.train.loop import SplitData
    from polymorphd.models.train.train import SELECT_VIDEOS, Dataset, first_videos

    vids = np.array([5, 5, 3, 3, 3, 9, 1])  # stored video by video; ids need not be sorted
    split = SplitData(
        "validation", np.arange(7)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8), np.eye(7, 4),
        vids, [np.full((1, 5), i, np.float32) for i in range(7)], np.arange(7, dtype=np.float32),
        np.arange(7, dtype=np.float32)[:, None, None],
    )  # fmt: skip
    two = first_videos(split, 2)
    assert two.video_ids.tolist() == [5, 5, 3, 3, 3] and two.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert two.Y.tolist() == split.Y[:5].tolist() and two.counts.tolist() == [0, 1, 2, 3, 4]
    assert [b[0, 0] for b in two.boxes] == [0, 1, 2, 3, 4] and two.mel[:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert first_videos(split, 4) is split and first_videos(split, 9) is split
    d = Dataset(Path("x"), [], [], split, split, split)
    assert d.select.videos == min(SELECT_VIDEOS, 4)


def test_resume_skips_finished_stages(run, dataset: Path) -> None:
    out, _ = run
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    res = train(dataset, out, get_preset("tiny"), seed=3, progress=False)
    assert res.ran == [] and res.skipped == list(STAGES)
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before


def test_resume_retrains_only_missing_stages_and_keeps_the_base_bit_identical(run, dataset, tmp_path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(run[0], out)
    log = json.loads((out / "stages.json").read_text())
    for name in ("adapters", "calibration"):
        del log["stages"][name]
    (out / "stages.json").write_text(json.dumps(log))
    base = load_run(out).vit.state_dict()
    res = train(dataset, out, get_preset("tiny"), seed=3, progress=False)
    assert res.ran == ["adapters", "calibration"]
    after = load_run(out)
    assert all(torch.equal(v, after.vit.state_dict()[k]) for k, v in base.items())
    # per-stage seeding: the re-trained adapters equal the uninterrupted run's
    first = load_run(run[0])
    for a, b in zip(first.adapters, after.adapters, strict=True):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_adapter_training_that_touches_the_base_is_caught(run, dataset, tmp_path, monkeypatch) -> None:
    out = tmp_path / "tamper"
    shutil.copytree(run[0], out)
    log = json.loads((out / "stages.json").read_text())
    del log["stages"]["adapters"], log["stages"]["calibration"]
    (out / "stages.json").write_text(json.dumps(log))
    from polymorphd.models.nn import lora

    real = lora.adapter_logits

    def tampering(vit, tokens, adapter):
        with torch.no_grad():
            vit.norm.weight.add_(1e-3)
        return real(vit, tokens, adapter)

    monkeypatch.setattr(lora, "adapter_logits", tampering)
    with pytest.raises(RuntimeError, match=r"backbone tensor norm\.weight changed"):
        train(dataset, out, get_preset("tiny"), seed=3, progress=False)


def test_resume_with_other_settings_is_refused(run, dataset) -> None:
    with pytest.raises(ConfigError, match="different seed"):
        train(dataset, run[0], get_preset("tiny"), seed=4, progress=False)


def test_cli_missing_or_invalid_data_gives_a_clear_error(tmp_path, capsys) -> None:
    missing = tmp_path / "nope"
    assert cli_main(["train", "--data", str(missing), "--out", str(tmp_path / "r"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"error: dataset directory {missing} does not exist" in err and "polymorphd data synth" in err
    (tmp_path / "empty").mkdir()
    assert cli_main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.json is missing" in err and "splits found: none" in err
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "train.json").write_text("{not json")
    assert cli_main(["train", "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a bad dataset


def test_cli_rejects_bad_numbers(tmp_path, dataset, capsys) -> None:
    assert cli_main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert (
        cli_main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--init-from", "x.pt"]) == 2
    )
    assert "--init-from x.pt does not exist" in capsys.readouterr().err


def test_presets_meet_their_budgets() -> None:
    base, small, tiny = PRESETS["base"], PRESETS["small"], PRESETS["tiny"]
    assert base.depth >= 8 and len(base.exit_after) >= 2 and base.lora_last_blocks <= base.depth // 3
    assert small.img_size == 64 and len(small.exit_after) == 2
    assert (tiny.img_size, tiny.patch_size, tiny.depth, tiny.embed_dim, tiny.exit_after) == (
        32,
        8,
        4,
        48,
        (1, 2),
    )
    assert get_preset("small", epochs=3).generalist.epochs == 3
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_a_step_budget_turns_into_epochs_by_dataset_size() -> None:
    small = get_preset("small")
    assert small.generalist_steps == 1080 and small.generalist.batch_size == 32
    assert small.for_frames(8640).generalist.epochs == 4  # the default dataset: 144 videos x 60 frames
    assert small.for_frames(1440).generalist.epochs == 24  # 24 videos
    assert small.for_frames(10).generalist.epochs == 1080  # one step an epoch
    assert get_preset("small", epochs=3).for_frames(8640).generalist.epochs == 3  # --epochs wins
    assert get_preset("tiny").for_frames(10) == get_preset("tiny")  # no step budget: epochs as given
    with pytest.raises(ConfigError, match="generalist_steps must be >= 1, got 0"):
        replace(small, generalist_steps=0)


def test_augmentation_is_seeded_and_identity_when_disabled() -> None:
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    cfg = Augment()
    a = augment_batch(frames, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(frames, cfg, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == frames.shape and torch.equal(a, b)
    assert not torch.equal(a, frames)
    off = Augment(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
        channel_shuffle=0.0,
    )  # fmt: skip
    assert torch.equal(augment_batch(frames, off, torch.Generator().manual_seed(1)), frames)
    flip = replace(off, flip=1.0)
    assert torch.equal(augment_batch(frames, flip, torch.Generator()), frames.flip(2))
    shuffled = augment_batch(frames, replace(off, channel_shuffle=1.0), torch.Generator().manual_seed(2))
    for got, want in zip(shuffled, frames, strict=True):  # every frame is a channel permutation of itself
        assert any(torch.equal(got, want[..., list(p)]) for p in itertools.permutations(range(3)))


def test_mixup_blends_inputs_and_soft_targets_alike() -> None:
    x = torch.arange(4.0).view(4, 1) * torch.ones(4, 3)
    y = torch.eye(4)
    mx, my = mixup(x, y, alpha=0.4, gen=torch.Generator().manual_seed(0))
    # input row i = lam * x[i] + (1 - lam) * x[j]; the targets carry the same weights
    assert torch.allclose(my.sum(1), torch.ones(4))
    assert torch.allclose(mx[:, 0], my @ x[:, 0])
    same, _ = mixup(x, y, alpha=0.4, gen=torch.Generator().manual_seed(0))
    assert torch.equal(same, mx)
    assert mixup(x, y, alpha=0.0, gen=torch.Generator())[0] is x


def test_copy_paste_moves_an_object_and_its_label() -> None:
    frames = torch.full((2, 16, 16, 3), 10, dtype=torch.uint8)
    frames[1] = 20
    frames[0, 0:8, 0:8] = 50  # class 0 object
    frames[1, 4:8, 4:8] = 200  # class 1 object
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    boxes = [np.array([[0, 0, 0, 8, 8]], np.float32), np.array([[1, 4, 4, 8, 8]], np.float32)]
    for seed in range(5):
        out, y2, b2, donors = paste_objects(frames, y, boxes, 1.0, torch.Generator().manual_seed(seed))
        assert donors == [1, 0]  # each frame got its object from the other
        assert (out[0] == 200).all(-1).sum() == 16 and y2[0, 1] == 1  # frame 0 got the 4x4 class-1 object
        # frame 1 then got one of frame 0's boxes as frame 0 is now: its class-0 object or the pasted one
        got = (out[1] == 50).all(-1).sum() == 64 and y2[1, 0] == 1
        assert got or (out[1] == 200).all(-1).sum() >= 16
        hidden = (out[1, 4:8, 4:8] != 200).all(-1).float().mean() > 0.5
        assert y2[1, 1] == (0 if hidden else 1)  # a label survives only if its object is still visible
        assert y2[0, 0] == 1  # 16 of 64 pixels covered: class 0 stays
        assert sorted(b2[0][:, 0].tolist()) == [0, 1]  # the pasted box joins the frame's boxes
        r = b2[0][b2[0][:, 0] == 1][0].astype(int)
        assert (out[0, r[2] : r[4], r[1] : r[3]] == 200).all()
    assert paste_objects(frames, y, boxes, 0.0, torch.Generator())[0] is frames


def test_boxes_follow_the_crop_and_flip_and_lost_objects_lose_their_label() -> None:
    frames = torch.zeros((1, 32, 32, 3), dtype=torch.uint8)
    frames[0, 4:12, 20:28] = 255  # one bright object, box x 20..28, y 4..12
    box = [np.array([[2, 20, 4, 28, 12]], np.float32)]
    y = torch.tensor([[0.0, 0.0, 1.0]])
    cfg = Augment(scale=(0.5, 0.9), flip=0.5, brightness=0, contrast=0, saturation=0, channel_shuffle=0)
    for seed in range(10):
        out, geom = augment_geometry(frames, cfg, torch.Generator().manual_seed(seed))
        moved, y2 = move_boxes(box, y, geom, 32)
        bright = np.argwhere(out[0, :, :, 0].numpy() > 200)  # (row, col) of object pixels
        if len(moved[0]) == 0:
            assert y2[0, 2] == 0 and len(bright) < 0.25 * 64 * 4  # cropped away: label gone
            continue
        _, x0, y0, x1, y1 = moved[0][0]
        assert y2[0, 2] == 1
        assert (bright[:, 1] >= x0 - 1).all() and (bright[:, 1] <= x1).all()
        assert (bright[:, 0] >= y0 - 1).all() and (bright[:, 0] <= y1).all()
    flip = Geometry(torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert np.allclose(move_boxes(box, y, flip, 32)[0][0], [[2, 4, 4, 12, 12]])


def test_patch_targets_mark_the_patches_a_box_covers() -> None:
    box = [np.array([[1, 8, 0, 24, 8]], np.float32), np.zeros((0, 5), np.float32)]
    t = patch_targets(box, 3, 32, 8)  # 4x4 patches, row-major
    assert t.shape == (2, 16, 3) and t[1].sum() == 0
    assert t[0, :, 1].nonzero().flatten().tolist() == [1, 2] and t[0].sum() == 2


def test_train_boxes_match_the_labels(dataset) -> None:
    data = load_data(dataset, 32)
    assert data.train.boxes is not None and len(data.train.boxes) == len(data.train.Y)
    for b, y in zip(data.train.boxes, data.train.Y, strict=True):
        assert set(b[:, 0].astype(int)) == set(np.flatnonzero(y))
        assert (b[:, 1:] >= -1).all() and (b[:, 1:] <= 33).all() and (b[:, 3] > b[:, 1]).all()


def test_splits_know_each_frames_video(dataset) -> None:
    data = load_data(dataset, 32)
    for split, videos in ((data.train, 4), (data.calib, 2), (data.report, 2)):  # the fixture's (4, 2, 2)
        ids = split.video_ids
        assert len(ids) == len(split.Y) and split.videos == videos
        assert (np.diff(ids) != 0).sum() == videos - 1  # stored video by video


def test_training_input_is_the_runtime_preprocessing() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    spec = InputSpec(size=32)
    x = to_input(torch.from_numpy(frames), spec, torch.device("cpu"))
    assert np.array_equal(x.numpy(), preprocess_batch(frames, spec))


@pytest.mark.slow
def test_torchrun_two_ranks_train_one_run(dataset, tmp_path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "polymorphd.daemon.cli", "train", "--data", str(dataset), "--out", str(out),
           "--preset", "tiny", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run written to") == 1  # only rank 0 prints and writes
    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == 2 and len(rep["exits"]) == 8
    assert len(load_run(out).adapters) == len(rep["contexts"])


def test_init_from_a_checkpoint_starts_the_generalist_from_its_weights(dataset, tmp_path) -> None:
    from dataclasses import replace as dc_replace

    from polymorphd.models.nn.checkpoint import save_checkpoint
    from polymorphd.models.nn.vit import VisionTransformer

    preset = get_preset("tiny", epochs=1)
    torch.manual_seed(7)
    src = VisionTransformer(dc_replace(preset, stem="patch").vit_config(5))  # another class count: new head
    save_checkpoint(tmp_path / "ck.pt", src)
    res = train(dataset, tmp_path / "run", preset, init_from=str(tmp_path / "ck.pt"), progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["vit"]["stem"] == "patch" and cfg["init_from"] == str(tmp_path / "ck.pt")
    notes = json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]["generalist"]["result"]
    assert any("head re-initialised" in n for n in notes["init_notes"])
    assert res.ran == list(STAGES)


def test_preset_fields_newer_than_saved_runs_are_left_out_at_their_defaults() -> None:
    """selection_recall / selection_min_positives came after runs were saved: at their defaults they are not
    in the run config's preset_config, so those runs keep resuming; set, they are recorded."""
    p = get_preset("small")
    assert "selection_recall" not in p.to_dict() and "selection_min_positives" not in p.to_dict()
    assert replace(p, selection_recall=0.8).to_dict()["selection_recall"] == 0.8
    with pytest.raises(ConfigError, match="selection_recall must be in"):
        replace(p, selection_recall=0.0)
