"""Issue 14 end to end: train --audio on a tiny dataset with sound, export, serve with a WAV source.

One tiny trained run (synth --audio, ``train(audio=True)``, about 20 s) and its bundle serve every test here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from polymorphd.daemon.audio import AudioSource
from polymorphd.daemon.engine import load_engine
from polymorphd.export.core.verify import verify_bundle
from polymorphd.models.core.errors import BundleError
from tests.daemon.fakes import Sub, config, running
from tests.helpers import LABEL_FIELDS


@pytest.fixture(scope="module")
def av(tmp_path_factory) -> dict[str, Path]:
    from polymorphd.export.bundle import export_bundle
    from polymorphd.models.data.soundscape import AudioConfig
    from polymorphd.models.data.synth import SynthConfig, write_dataset
    from polymorphd.models.train.presets import get_preset
    from polymorphd.models.train.train import train

    root = tmp_path_factory.mktemp("av")
    cfg = SynthConfig(
        num_classes=8, num_contexts=2, width=32, height=32, frames_per_video=12, hubs=1, hub_contexts=2,
        scene_length=(6, 12),
    )  # fmt: skip
    data = write_dataset(root / "data", cfg, (4, 2, 2), progress=False, audio=AudioConfig())
    train(data, root / "run", get_preset("tiny"), seed=3, progress=False)
    visual_only = sorted(p.name for p in (root / "run").iterdir())
    resumed = train(data, root / "run", get_preset("tiny"), seed=3, progress=False, audio=True)
    bundle = export_bundle(root / "run", root / "bundle", bench_runs=1, progress=False)
    video = json.loads((data / "annotations" / "test.json").read_text())["videos"][0]
    return {
        "data": data,
        "run": root / "run",
        "bundle": bundle,
        "wav": data / "frames" / video["audio"]["file_name"],
        "visual_only": visual_only,
        "resumed": resumed,
    }


def test_train_audio_saves_calibrated_audiovisual_exits_and_reports_them(av):
    from polymorphd.models.train.run import AVEXITS, load_run

    assert AVEXITS not in av["visual_only"]  # a run without --audio is as before
    assert av["resumed"].ran == ["avexits"]  # --audio on a finished run trains only the audiovisual exits

    run = load_run(av["run"])
    assert run.avexits is not None
    assert [m.cfg.after_block for m in run.avexits.exits] == [e.after_block for e in run.exit_configs]
    for cal in run.avexits.calibration:
        assert 0.0 <= cal["lo"] <= cal["hi"] <= 1.0 and 0.0 <= cal["count_margin"] <= 0.5
        assert len(cal["logit_offsets"]) == run.vit_config.num_classes
    report = json.loads((av["run"] / "report.json").read_text())["audio"]
    assert {"visual@1", "audiovisual@1", "visual@2", "audiovisual@2"} <= set(report["exits"])
    assert report["final"]["count_mae"] >= 0.0


def test_the_bundle_carries_the_audio_exits_under_schema_2(av):
    m = verify_bundle(av["bundle"])
    assert m.schema_version == 2 and m.audio is not None
    assert [e.file for e in m.audio.exits] == ["av_exit_0.onnx", "av_exit_1.onnx"]
    assert all(e.file in m.files for e in m.audio.exits)
    assert (
        "mel.onnx" not in m.files and "tail_count.onnx" not in m.files
    )  # numpy front end, last exit's count


def _edited(av, tmp_path: Path, edit) -> Path:
    b = tmp_path / "b"
    shutil.copytree(av["bundle"], b)
    d = json.loads((b / "manifest.json").read_text())
    edit(d, b)
    (b / "manifest.json").write_text(json.dumps(d))
    return b


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda d, b: d.pop("audio"), "schema_version 2 needs an 'audio' block"),
        (lambda d, b: d.update(schema_version=1), "schema_version 1 cannot carry an 'audio' block"),
        (lambda d, b: d["audio"]["exits"][0].update(after_block=3), "needs its visual twin"),
        (lambda d, b: d["audio"]["exits"][1].update(count_margin=0.9), "count_margin 0.9 must be in"),
        (lambda d, b: d["audio"]["mel"].update(n_mels=30), "not a valid front end"),
        (lambda d, b: (b / "av_exit_1.onnx").write_bytes(b"garbage"), "av_exit_1.onnx: sha256"),
        (lambda d, b: (b / "av_exit_0.onnx").unlink(), "av_exit_0.onnx: missing"),
    ],
)
def test_verify_and_the_engine_refuse_a_broken_audio_block(av, tmp_path, edit, error):
    b = _edited(av, tmp_path, edit)
    with pytest.raises(BundleError, match=error):
        verify_bundle(b)
    with pytest.raises(BundleError, match=error):
        load_engine(b)


def test_audio_frames_get_a_count_and_no_audio_is_todays_path(av):
    engine = load_engine(av["bundle"])
    audio = AudioSource(f"wav:{av['wav']}", engine.mel, fps=10.0)
    frame = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    with_audio = engine.infer(frame, engine.new_state(), audio.mel_window(3, 0))
    without = engine.infer(frame, engine.new_state())
    assert with_audio.count is not None and with_audio.count >= 0.0
    assert without.count is None
    # without audio the visual exits answer, as a bundle without audio exits would
    assert with_audio.exit == "final" or with_audio.exit in (0, 1)
    silent = engine.infer(frame, engine.new_state(), np.full_like(audio.mel_window(3, 0), -13.8))
    assert silent.count != pytest.approx(with_audio.count, abs=1e-6) or not np.allclose(
        silent.probs, with_audio.probs
    )  # the audio reaches the answer


def test_a_daemon_with_a_wav_source_publishes_counts_old_subscribers_still_parse(av, tmp_path):
    cfg = config(tmp_path, av["bundle"], audio=f"wav:{av['wav']}", audio_fps=10.0)
    with running(cfg, None) as d:
        sub = Sub(d.publisher.address, "labels/")
        msgs = [sub.recv(10.0)[1] for _ in range(5)]
        sub.close()
        status = d.status()
    for p in msgs:
        assert p["v"] == 2 and p["count"] >= 0.0 and set(p) >= LABEL_FIELDS  # a v1 reader finds its fields
    assert status["audio"]["state"] == "on" and status["audio"]["uri"] == f"wav:{av['wav']}"


def test_a_failing_audio_source_falls_back_to_the_visual_exits_and_says_so(av, tmp_path):
    cfg = config(tmp_path, av["bundle"], audio=f"wav:{tmp_path}/absent.wav")
    with running(cfg, None) as d:
        sub = Sub(d.publisher.address, "labels/")
        msgs = [sub.recv(10.0)[1] for _ in range(3)]
        sub.close()
        status = d.status()
    assert all(p["v"] == 1 and "count" not in p for p in msgs)
    assert status["audio"]["state"] == "failed" and "absent.wav" in status["audio"]["error"]


def test_without_audio_configured_the_stream_and_status_are_as_today(av, tmp_path):
    with running(config(tmp_path, av["bundle"]), None) as d:
        sub = Sub(d.publisher.address, "labels/")
        msgs = [sub.recv(10.0)[1] for _ in range(3)]
        sub.close()
        status = d.status()
    assert all(p["v"] == 1 and "count" not in p for p in msgs)
    assert "audio" not in status


def test_eval_reports_the_audio_mode_beside_the_visual_one(av):
    from polymorphd.daemon.tools.evalprint import format_footer
    from polymorphd.daemon.tools.evaluate import evaluate
    from polymorphd.models.data.tao import load_split

    engine = load_engine(av["bundle"])
    split = load_split(av["data"], "test", include_unannotated=True)
    report = evaluate(engine, split, ["polymorph", "full"]).report
    assert set(report["modes"]) == {"polymorph", "full", "polymorph+audio"}  # full runs no exit: no twin
    visual, audio = report["modes"]["polymorph"], report["modes"]["polymorph+audio"]
    assert audio["frames"] == visual["frames"] == report["frames"]
    assert "count_mae" not in visual and 0.0 <= audio["count_mae"] < 10.0
    assert "count MAE (objects per annotated frame): polymorph+audio" in format_footer(report)


def test_a_bundle_without_audio_is_written_as_before(tiny_bundle):
    d = json.loads((tiny_bundle / "manifest.json").read_text())
    assert d["schema_version"] == 1 and "audio" not in d
    assert not any(f.startswith("av_exit") for f in d["files"])
    assert load_engine(tiny_bundle).mel is None


def test_a_malformed_avexits_file_is_named(av, tmp_path):
    import torch

    from polymorphd.models.core.errors import CheckpointError
    from polymorphd.models.nn.vit import ViTConfig
    from polymorphd.models.train.run import AVEXITS, load_avexits, load_config

    shutil.copytree(av["run"], tmp_path / "run")
    torch.save({"mel": {"n_mels": 30}, "exits": []}, tmp_path / "run" / AVEXITS)
    vit_cfg = ViTConfig(**load_config(tmp_path / "run")["vit"])
    with pytest.raises(CheckpointError, match=r"avexits\.pt: malformed audiovisual exits"):
        load_avexits(tmp_path / "run", vit_cfg)
    # an avexits.pt from before issue 14c: linear count heads on the exits
    saved = torch.load(av["run"] / AVEXITS, weights_only=False)
    for e in saved["exits"]:
        state = {k: v for k, v in e["state"].items() if not k.startswith("count_head")}
        width = e["state"]["count_head.fc1.weight"].shape[1]
        e["state"] = state | {"count_head.weight": torch.zeros(1, width), "count_head.bias": torch.zeros(1)}
    torch.save(saved, tmp_path / "run" / AVEXITS)
    with pytest.raises(CheckpointError, match=r"count heads are linear; since issue 14c"):
        load_avexits(tmp_path / "run", vit_cfg)
