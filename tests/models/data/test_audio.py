"""Audio tracks: WAV I/O, the window aligned with each frame, the loader's audio field, synth --audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from polymorphd.models.core.errors import DataError
from polymorphd.models.core.melspec import MelConfig
from polymorphd.models.data import audio, soundscape, synth, tao

SR, FPS = 16000, 10.0


def peak_hz(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def tone_dataset(root: Path, tone_frame: int = 7, hz: float = 1000.0, frames: int = 20) -> Path:
    """One video of ``frames`` frames whose audio is silent except a tone during frame ``tone_frame``."""
    (root / "annotations").mkdir(parents=True)
    (root / "frames" / "v").mkdir(parents=True)
    x = np.zeros(int(frames / FPS * SR), dtype=np.float32)
    a, b = int(tone_frame / FPS * SR), int((tone_frame + 1) / FPS * SR)
    x[a:b] = 0.5 * np.sin(2 * np.pi * hz * np.arange(b - a) / SR)
    audio.write_wav(root / "frames" / "v.wav", x, SR)
    images = []
    for i in range(frames):
        (root / "frames" / "v" / f"{i:06d}.jpg").write_bytes(b"x")
        images.append({"id": i + 1, "video_id": 1, "frame_index": i, "file_name": f"v/{i:06d}.jpg"})
    video = {"id": 1, "name": "v", "fps": FPS, "audio": {"file_name": "v.wav", "sample_rate": SR}}
    doc = {"videos": [video], "images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (root / "annotations" / "train.json").write_text(json.dumps(doc))
    return root


def test_a_tone_at_a_known_frame_is_in_that_frames_window(tmp_path):
    split = tao.load_split(tone_dataset(tmp_path), "train")
    frames = split.frames()
    # a window of exactly one frame period: the tone is in frame 7's window and in no other
    w = audio.split_windows(split.audio_tracks(), frames, int(SR / FPS))
    energy = (w**2).mean(axis=1)
    assert int(np.argmax(energy)) == 7
    assert energy[7] > 0.1 and np.delete(energy, 7).max() < 1e-6
    assert peak_hz(w[7]) == pytest.approx(1000.0, abs=SR / len(w[7]))
    # the mel front end's longer window (0.53 s) ending at frame 7 holds the tone in its last 0.1 s
    long = audio.split_windows(split.audio_tracks(), frames, MelConfig().samples)
    tail = long[7, -int(SR / FPS) :]
    assert (tail**2).mean() > 0.1 and (long[7, : -int(SR / FPS)] ** 2).mean() < 1e-6
    assert (long[6] ** 2).mean() < 1e-6  # a frame before the tone hears nothing of it


def test_window_at_pads_before_the_start_and_counts_samples_past_the_end():
    x = np.arange(1, 11, dtype=np.float32)  # 10 samples at 10 Hz: 1 s
    w, missing = audio.window_at(x, 10, 0.3, 5)
    assert w.tolist() == [0, 0, 1, 2, 3] and missing == 0
    w, missing = audio.window_at(x, 10, 1.2, 5)
    assert w.tolist() == [8, 9, 10, 0, 0] and missing == 2
    assert audio.frame_time(0, 10.0) == pytest.approx(0.1)


def test_wav_round_trip_and_bad_files(tmp_path):
    x = np.sin(np.linspace(0, 20, 1000)).astype(np.float32) * 0.7
    audio.write_wav(tmp_path / "a.wav", x, 8000)
    y, sr = audio.read_wav(tmp_path / "a.wav")
    assert sr == 8000 and np.abs(y - x).max() < 1e-4
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(DataError, match=r"bad\.wav: cannot read WAV audio"):
        audio.read_wav(tmp_path / "bad.wav")


def test_the_audio_field_is_validated(tmp_path):
    root = tone_dataset(tmp_path)
    path = root / "annotations" / "train.json"
    doc = json.loads(path.read_text())
    del doc["videos"][0]["fps"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"needs 'fps' > 0"):
        tao.load_split(root, "train")
    doc["videos"][0]["fps"] = FPS
    doc["videos"][0]["audio"]["file_name"] = "missing.wav"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"audio file .*missing\.wav does not exist"):
        tao.load_split(root, "train")


def test_a_video_without_audio_is_named_when_windows_are_asked(tmp_path):
    root = tone_dataset(tmp_path)
    path = root / "annotations" / "train.json"
    doc = json.loads(path.read_text())
    del doc["videos"][0]["audio"]
    path.write_text(json.dumps(doc))
    split = tao.load_split(root, "train")
    assert split.videos[0].audio is None and split.audio_tracks() == {}
    with pytest.raises(DataError, match=r"video 1 has no audio track.*synth --audio"):
        audio.split_windows(split.audio_tracks(), split.frames(), 100)


def test_synth_audio_writes_a_wav_per_video_and_leaves_frames_as_they_were(tmp_path):
    cfg = synth.SynthConfig(num_classes=12, num_contexts=3, frames_per_video=30, width=48, height=48)
    plain = synth.write_dataset(tmp_path / "plain", cfg, (2, 0, 1), progress=False)
    heard = synth.write_dataset(
        tmp_path / "av", cfg, (2, 0, 1), progress=False, audio=soundscape.AudioConfig()
    )
    a, b = (json.loads((d / "annotations" / "train.json").read_text()) for d in (plain, heard))
    assert "audio" not in a["videos"][0] and "fps" not in a["videos"][0]  # without --audio: as before
    assert b["videos"][0]["audio"] == {"file_name": "train/synth_00000.wav", "sample_rate": 16000}
    assert a["images"] == b["images"] and a["annotations"] == b["annotations"]
    for im in a["images"]:
        assert (plain / "frames" / im["file_name"]).read_bytes() == (
            heard / "frames" / im["file_name"]
        ).read_bytes()
    split = tao.load_split(heard, "train")
    for v in split.videos:
        x, sr = audio.read_wav(v.audio.path)
        assert sr == 16000 and len(x) == 3 * sr  # 30 frames at 10 frames/s
    assert [f.count for f in split.frames()][:3] == [sum(1 for n in a["annotations"] if n["image_id"] == f.image_id)
                                                    for f in split.frames()[:3]]  # fmt: skip


def test_an_audible_object_sounds_at_its_class_signature_from_its_first_frame():
    cfg = soundscape.AudioConfig(audible=1.0, silence=0.0, offscreen=0.0, distractors=0.0, noise_floor=0.0)
    k, K = 5, 32
    frames = [(0, [])] * 10 + [(0, [(1, k)])] * 20  # the object enters at frame 10 (1.0 s)
    x = soundscape.render_soundscape(cfg, K, frames, np.random.default_rng(0))
    assert np.abs(x[: SR - 10]).max() == 0.0  # nothing before it enters
    onset = x[SR : SR + int(0.2 * SR)]
    f0, _f1, _ = soundscape.class_signature(k, K)
    assert peak_hz(onset) == pytest.approx(f0, abs=20)


def test_silence_offscreen_and_distractors_are_there():
    K, rng = 16, np.random.default_rng(1)
    frames = [(s, [(s, s % K)]) for s in range(40) for _ in range(10)]  # 40 one-object scenes of 1 s
    mute = soundscape.render_soundscape(
        soundscape.AudioConfig(silence=1.0, offscreen=0.0, distractors=0.0), K, frames, rng
    )
    assert np.abs(mute).max() < 0.05  # only the noise floor
    cfg = soundscape.AudioConfig(audible=0.0, silence=0.0, offscreen=1.0, distractors=0.0, noise_floor=0.0)
    hidden = soundscape.render_soundscape(cfg, K, frames, rng)
    assert np.abs(hidden).max() > 0.05  # nothing visible sounds, yet something off-screen does
    cfg = soundscape.AudioConfig(audible=0.0, silence=0.0, offscreen=0.0, distractors=2.0, noise_floor=0.0)
    assert np.abs(soundscape.render_soundscape(cfg, K, frames, rng)).max() > 0.01
