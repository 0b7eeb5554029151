"""Audio tracks of a TAO-format dataset: WAV files, frame timestamps and the window aligned with each frame.
Torch-free (numpy + the standard library's ``wave``).

A video entry of ``annotations/<split>.json`` may carry (both optional; a dataset without them loads as
before, docs/bundle.md "Datasets with audio"):

    "fps": 10.0,
    "audio": {"file_name": "train/synth_00000.wav", "sample_rate": 16000}

``file_name`` is relative to ``DIR/frames/`` like the images', the WAV is 16-bit PCM (mono, or the first
channel is used), and its sample 0 is the start of frame 0. Frame i covers ``[i / fps, (i + 1) / fps)`` and
its timestamp is the end of that interval (when a camera delivers it): the audio window of a frame is the
``samples`` samples that end there, zero-padded before the track starts, as a live microphone would have
them when the frame arrives.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymorphd.models.core.errors import DataError

__all__ = ["AudioTrack", "frame_time", "read_wav", "split_windows", "window_at", "write_wav"]


@dataclass(frozen=True)
class AudioTrack:
    path: Path
    sample_rate: int
    fps: float  # the video's frame rate: ties frame_index to the audio clock


def frame_time(frame_index: int, fps: float) -> float:
    """Seconds from the start of the video to the end of frame ``frame_index`` (its timestamp)."""
    return (frame_index + 1) / fps


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono float samples in [-1, 1] -> 16-bit PCM WAV (clipped)."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV -> (float32 samples in [-1, 1] of its first channel, sample rate)."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise DataError(f"{path}: cannot read WAV audio: {exc}") from exc
    if width != 2:
        raise DataError(f"{path}: WAV sample width is {8 * width} bits; only 16-bit PCM is supported")
    pcm = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)[:, 0]
    return pcm.astype(np.float32) / 32768.0, rate


def window_at(samples: np.ndarray, sample_rate: int, t_end: float, length: int) -> tuple[np.ndarray, int]:
    """The ``length`` samples ending at ``t_end`` seconds, zero-padded where the track has none.

    Returns (window float32, missing): ``missing`` counts samples after the end of the track that the
    window asked for (an under-run when the track is a live buffer), not the padding before its start.
    """
    end = round(t_end * sample_rate)
    start = end - length
    out = np.zeros(length, dtype=np.float32)
    lo, hi = max(start, 0), min(end, len(samples))
    if hi > lo:
        out[lo - start : hi - start] = samples[lo:hi]
    return out, max(0, end - max(len(samples), start))


def split_windows(tracks: dict[int, AudioTrack], frames: Sequence, length: int) -> np.ndarray:
    """(F, length) float32: each frame's audio window (``frames``: tao.Frame, with video_id and frame_index).

    Raises DataError naming the video when one has no audio track or its sample rate differs from the rest.
    """
    out = np.zeros((len(frames), length), dtype=np.float32)
    loaded: dict[int, np.ndarray] = {}
    rates = {t.sample_rate for t in tracks.values()}
    if len(rates) > 1:
        raise DataError(f"audio tracks have different sample rates {sorted(rates)}; resample them to one")
    for i, f in enumerate(frames):
        track = tracks.get(f.video_id)
        if track is None:
            raise DataError(
                f"video {f.video_id} has no audio track (no 'audio' in its 'videos' entry); an audiovisual model "
                "needs audio for every video: regenerate with 'polymorphd data synth --audio'"
            )
        if f.video_id not in loaded:
            samples, rate = read_wav(track.path)
            if rate != track.sample_rate:
                raise DataError(
                    f"{track.path}: WAV sample rate is {rate} Hz but the annotations say {track.sample_rate}"
                )
            loaded = {f.video_id: samples}  # frames come video by video: keep one track in memory
        out[i] = window_at(
            loaded[f.video_id], track.sample_rate, frame_time(f.frame_index, track.fps), length
        )[0]
    return out
