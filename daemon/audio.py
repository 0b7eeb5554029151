"""Audio beside the camera: a WAV file or an ALSA capture device, synchronised with frames by timestamp.
Torch-free.

Each frame gets the audio window that ends at its timestamp (``models/data/audio.py`` defines it for
datasets: frame i of a video at ``fps`` ends at (i + 1) / fps):

- ``wav:PATH`` (media clock): the WAV is the sound track of a video source; frame ``index`` ends at
  (index + 1) / fps seconds into the file. A window that reaches past the end of the file is an under-run.
- ``alsa:DEVICE`` (capture clock): a capture thread writes blocks into an ``AudioBuffer`` stamped with the
  wall clock; a frame's window ends at its capture time ``ts_ns``. Samples the window needs that have not
  arrived yet (the device is late or stalled) are an under-run. Needs the ``audio`` extra (sounddevice,
  which needs PortAudio: Debian ``libportaudio2``), imported only when such a source is opened.

Under-runs are zero-padded, counted (windows and samples) and never block the frame loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polymorphd.models.core.errors import ConfigError, DataError, MissingExtraError
from polymorphd.models.core.melspec import MelConfig, log_mel
from polymorphd.models.data.audio import frame_time, read_wav, window_at

log = logging.getLogger(__name__)


@dataclass
class UnderRuns:
    windows: int = 0  # windows that lacked samples
    samples: int = 0  # samples zero-padded for lack of data

    def add(self, missing: int) -> None:
        if missing > 0:
            self.windows += 1
            self.samples += missing


class AudioBuffer:
    """A ring of the last ``seconds`` of samples on a sample clock anchored at the first block's time.

    ``write(block, end_ns)``: the block's last sample was captured at ``end_ns``; sample n's time is then
    t0 + n / rate (the device's sample clock; drift against the wall clock is not corrected).
    """

    def __init__(self, sample_rate: int, seconds: float = 4.0) -> None:
        self.rate = int(sample_rate)
        self._ring = np.zeros(max(1, int(seconds * sample_rate)), dtype=np.float32)
        self._written = 0  # samples written since the start
        self._t0_ns: int | None = None
        self._lock = threading.Lock()
        self.underruns = UnderRuns()

    def write(self, block: np.ndarray, end_ns: int) -> None:
        x = np.asarray(block, dtype=np.float32).reshape(-1)[-len(self._ring) :]
        with self._lock:
            if self._t0_ns is None:
                self._t0_ns = int(end_ns - len(x) * 1e9 / self.rate)
            pos = np.arange(self._written, self._written + len(x)) % len(self._ring)
            self._ring[pos] = x
            self._written += len(x)

    def window(self, end_ns: int, length: int) -> np.ndarray:
        """The ``length`` samples ending at ``end_ns``; not yet written (or no longer kept) ones are zero."""
        out = np.zeros(length, dtype=np.float32)
        with self._lock:
            if self._t0_ns is None:
                self.underruns.add(length)
                return out
            end = round((end_ns - self._t0_ns) * self.rate / 1e9)
            start = end - length
            lo, hi = max(start, self._written - len(self._ring), 0), min(end, self._written)
            if hi > lo:
                out[lo - start : hi - start] = self._ring[np.arange(lo, hi) % len(self._ring)]
            self.underruns.add(max(0, end - max(self._written, start)))
        return out


class WavAudio:
    """``wav:PATH`` on the media clock: the window ending at frame ``index``'s end, (index + 1) / fps."""

    def __init__(self, path: str | Path, mel: MelConfig, fps: float) -> None:
        if not fps > 0:
            raise ConfigError(f"audio fps must be > 0 (the video's frame rate), got {fps!r}")
        try:
            self.samples, rate = read_wav(Path(path))
        except DataError as exc:
            raise ConfigError(f"audio source wav:{path}: {exc}") from exc
        if rate != mel.sample_rate:
            raise ConfigError(
                f"audio source wav:{path} is {rate} Hz; the bundle's audio front end expects {mel.sample_rate} Hz "
                "(resample it, e.g. ffmpeg -ar 16000)"
            )
        self.mel, self.fps, self.uri = mel, float(fps), f"wav:{path}"
        self.underruns = UnderRuns()

    def window(self, index: int, ts_ns: int) -> np.ndarray:
        del ts_ns  # the media clock: a file has no capture time
        w, missing = window_at(
            self.samples, self.mel.sample_rate, frame_time(index, self.fps), self.mel.samples
        )
        self.underruns.add(missing)
        return w

    def start(self) -> None:
        """Nothing to start: the file is read at load."""

    def stop(self) -> None:
        """Nothing to stop."""


class AlsaAudio:
    """``alsa:DEVICE`` on the capture clock, through sounddevice's input stream (the ``audio`` extra)."""

    def __init__(self, device: str, mel: MelConfig, block_ms: float = 20.0) -> None:
        try:
            import sounddevice  # the audio extra; needs PortAudio (Debian libportaudio2)
        except (ImportError, OSError) as exc:
            raise MissingExtraError(
                f"audio source alsa:{device} needs the audio extra: pip install 'polymorphd[audio]' and "
                f"apt-get install libportaudio2 ({exc})"
            ) from exc
        self._sd: Any = sounddevice
        self.mel, self.device, self.uri = mel, device, f"alsa:{device}"
        self.buffer = AudioBuffer(mel.sample_rate)
        self.underruns = self.buffer.underruns
        self._block = max(1, int(block_ms * mel.sample_rate / 1000))
        self._stream: Any = None

    def _on_block(self, data: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        import time

        if status:
            log.debug("audio %s: %s", self.uri, status)  # an overflow loses samples; the clock absorbs it
        self.buffer.write(data[:, 0], time.time_ns())

    def start(self) -> None:
        try:
            self._stream = self._sd.InputStream(
                device=self.device or None, channels=1, samplerate=self.mel.sample_rate, dtype="float32",
                blocksize=self._block, callback=self._on_block,
            )  # fmt: skip
            self._stream.start()
        except Exception as exc:  # PortAudioError and ValueError name the device problem
            raise ConfigError(f"audio source {self.uri} cannot be opened: {exc}") from exc

    def window(self, index: int, ts_ns: int) -> np.ndarray:
        del index
        return self.buffer.window(ts_ns, self.mel.samples)

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


class AudioSource:
    """The daemon's audio: ``wav:PATH`` or ``alsa:DEVICE``; ``mel(frame)`` is the frame's log-mel window."""

    def __init__(self, uri: str, mel: MelConfig, fps: float = 0.0) -> None:
        kind, _, rest = uri.partition(":")
        if kind == "wav" and rest:
            self._impl: WavAudio | AlsaAudio = WavAudio(rest, mel, fps)
        elif kind == "alsa":
            self._impl = AlsaAudio(rest, mel)
        else:
            raise ConfigError(f"audio source {uri!r} is not wav:PATH or alsa:DEVICE (e.g. alsa:hw:1,0)")
        self.uri, self.mel = uri, mel

    def start(self) -> None:
        self._impl.start()

    def stop(self) -> None:
        self._impl.stop()

    def window(self, index: int, ts_ns: int) -> np.ndarray:
        return self._impl.window(index, ts_ns)

    def mel_window(self, index: int, ts_ns: int) -> np.ndarray:
        """(1, n_mels, frames) float32: the log-mel of the frame's window (numpy: faster here than ONNX,
        bench/results/audio_frontend.json)."""
        return log_mel(self.window(index, ts_ns), self.mel)[None]

    def stats(self) -> dict[str, object]:
        u = self._impl.underruns
        return {"uri": self.uri, "underruns": u.windows, "underrun_samples": u.samples}


class AudioFeed:
    """The daemon's audio (config ``audio``): opened for the engine's audio exits, one log-mel window per frame.

    Any failure (a bundle without audio exits, a missing file or device, a read error) falls back to the visual
    exits for good and is reported on status; nothing here raises into the frame loop. A swapped-in bundle
    without (or with other) audio exits is served visually while the source stays open."""

    def __init__(self, uri: str | None, fps: float = 0.0) -> None:
        self.uri, self.fps = uri, fps
        self.source: AudioSource | None = None
        self.error: str | None = None  # why the daemon fell back to the visual exits

    def start(self, engine: Any) -> None:
        if not self.uri:
            return
        mel = getattr(engine, "mel", None)
        try:
            if mel is None:
                raise ConfigError(
                    f"bundle {engine.bundle_id} has no audio exits (re-export a run trained with --audio)"
                )
            source = AudioSource(self.uri, mel, fps=self.fps)
            source.start()
        except Exception as exc:  # a missing file, device or extra: the labels go on without audio
            self._failed(exc)
            return
        self.source = source
        log.info("audio %s feeds the audiovisual exits", self.uri)

    def window(self, index: int, ts_ns: int, engine: Any) -> np.ndarray | None:
        """Frame ``index``'s log-mel window, or None: serve it with the visual exits."""
        if self.source is None or getattr(engine, "mel", None) != self.source.mel:
            return None
        try:
            return self.source.mel_window(index, ts_ns)
        except Exception as exc:
            self._failed(exc)
            return None

    def status(self) -> dict[str, Any] | None:
        """For the status message; None when no audio is configured (the status is then as without audio)."""
        if not self.uri:
            return None
        if self.source is not None:
            return {"state": "on", **self.source.stats()}
        return {"state": "failed", "uri": self.uri, "error": self.error}

    def stop(self) -> None:
        if self.source is not None:
            with contextlib.suppress(Exception):
                self.source.stop()
        self.source = None

    def _failed(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.warning("audio source %s failed (%s); serving with the visual exits", self.uri, self.error)
        self.stop()
