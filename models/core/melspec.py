"""The audio front end shared by training, export and the daemon: a log-mel spectrogram of one short window.
Torch-free, pure numpy.

The SL-ViT paper (Bakhtiarnia et al., arXiv 2105.09121) fuses audio into its early exits; its audio branch
starts from a spectrogram. Ours is the board-light version: one window of ``MelConfig.samples`` samples
ending at the frame's timestamp, a Hann-windowed real DFT per hop (no centre padding), power, a triangular
mel filterbank (Slaney-style, HTK mel scale), log. ``dft_basis`` and ``mel_filterbank`` are also the
constants of the ONNX front end (``models/nn/audio.py``), so both compute the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["MelConfig", "dft_basis", "log_mel", "mel_filterbank"]

LOG_FLOOR = 1e-6  # log(power + floor): silence maps to a finite value


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16000
    n_fft: int = 512  # 32 ms at 16 kHz
    hop: int = 256
    frames: int = 32  # spectrogram frames: the window is n_fft + (frames - 1) * hop samples (0.53 s)
    n_mels: int = 32
    fmin: float = 60.0
    fmax: float = 7600.0
    patch_mels: int = 16  # the audio encoder's patch: n_mels/patch_mels x frames/patch_frames tokens
    patch_frames: int = 8

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop", "frames", "n_mels", "patch_mels", "patch_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MelConfig.{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"MelConfig needs 0 <= fmin < fmax <= sample_rate / 2, got fmin {self.fmin}, fmax {self.fmax}, "
                f"sample_rate {self.sample_rate}"
            )
        if self.n_mels % self.patch_mels or self.frames % self.patch_frames:
            raise ValueError(
                f"MelConfig patch {self.patch_mels}x{self.patch_frames} must divide the spectrogram "
                f"{self.n_mels}x{self.frames}"
            )

    @property
    def samples(self) -> int:
        """Window length in samples."""
        return self.n_fft + (self.frames - 1) * self.hop

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    @property
    def num_patches(self) -> int:
        return (self.n_mels // self.patch_mels) * (self.frames // self.patch_frames)

    @property
    def patch_dim(self) -> int:
        return self.patch_mels * self.patch_frames

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MelConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown MelConfig key(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(cfg: MelConfig) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters, area-normalised (Slaney) on the HTK mel scale."""
    bins = np.fft.rfftfreq(cfg.n_fft, 1.0 / cfg.sample_rate)
    edges = _mel_to_hz(
        np.linspace(_hz_to_mel(np.float64(cfg.fmin)), _hz_to_mel(np.float64(cfg.fmax)), cfg.n_mels + 2)
    )
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (hi - lo))
    return fb.astype(np.float32)


def dft_basis(cfg: MelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed real DFT as two (n_fft // 2 + 1, n_fft) float32 matrices (cos, -sin)."""
    n = np.arange(cfg.n_fft)
    k = np.arange(cfg.n_fft // 2 + 1)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.n_fft)  # periodic Hann
    angle = 2 * np.pi * k * n[None] / cfg.n_fft
    return (np.cos(angle) * window).astype(np.float32), (-np.sin(angle) * window).astype(np.float32)


class _Cache:
    def __init__(self) -> None:
        self.key: MelConfig | None = None
        self.window: np.ndarray = np.empty(0, np.float32)
        self.fb: np.ndarray = np.empty(0, np.float32)


_cache = _Cache()  # the filterbank of the last config: a pure function of it, built once


def log_mel(audio: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """Windows (..., samples) float -> log-mel (..., n_mels, frames) float32.

    ``audio`` must hold exactly ``cfg.samples`` samples on its last axis (``models/data/audio.window_at``).
    """
    x = np.asarray(audio, dtype=np.float32)
    if x.shape[-1] != cfg.samples:
        raise ValueError(f"audio window has {x.shape[-1]} samples; the mel front end expects {cfg.samples}")
    if _cache.key != cfg:
        n = np.arange(cfg.n_fft)
        _cache.window = (0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.n_fft)).astype(np.float32)
        _cache.fb = mel_filterbank(cfg)
        _cache.key = cfg
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft, axis=-1)[..., :: cfg.hop, :]
    spec = np.fft.rfft(frames * _cache.window, axis=-1)  # (..., frames, bins)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    mel = power @ _cache.fb.T  # (..., frames, n_mels)
    return np.log(mel + LOG_FLOOR).swapaxes(-1, -2).astype(np.float32)
