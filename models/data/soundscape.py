"""Synthetic audio tracks for synthetic videos (``polymorphd data synth --audio``). Torch-free, numpy.

What a microphone beside the camera would hear, made so that audio helps but does not give the answer away:

- each class has an acoustic signature: two partials (a fundamental, log-spaced over 4 octaves by class,
  and an overtone at a class-specific ratio) pulsed at a class-specific rate;
- an object that enters the scene starts sounding at its first frame (a loud onset, then calls of random
  length with random gaps) and stops when it leaves; some objects are silent (``audible``);
- some scenes are silent (``silence``), distractor noise bursts and chirps at other frequencies come at
  random (``distractors`` per second), and some scenes have a class that is heard but not seen
  (``offscreen``: it sounds, it is not labelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from polymorphd.models.core.errors import ConfigError

RATIOS = (1.5, 2.0, 2.5, 3.0)  # overtone / fundamental, by class
PULSES = (3.0, 4.5, 6.0, 8.0)  # Hz, the amplitude pulse rate, by class


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    fps: float = 10.0  # the video's frame rate: 60 frames make 6 s of audio
    audible: float = 0.8  # chance an object makes sound at all
    silence: float = 0.15  # chance a whole scene is silent (only the noise floor)
    offscreen: float = 0.3  # chance a scene has one class that is heard but not seen
    distractors: float = 0.4  # distractor events (noise bursts, chirps) per second
    noise_floor: float = 0.004  # std of the background hiss
    level: tuple[float, float] = (0.05, 0.25)  # amplitude range of one object's calls

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", tuple(self.level))
        if (
            isinstance(self.sample_rate, bool)
            or not isinstance(self.sample_rate, int)
            or self.sample_rate < 4000
        ):
            raise ConfigError(f"AudioConfig.sample_rate must be an integer >= 4000, got {self.sample_rate!r}")
        if not self.fps > 0:
            raise ConfigError(f"AudioConfig.fps must be > 0, got {self.fps!r}")
        for name in ("audible", "silence", "offscreen"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"AudioConfig.{name} must be a probability in [0, 1], got {getattr(self, name)!r}"
                )
        if self.distractors < 0 or self.noise_floor < 0:
            raise ConfigError("AudioConfig.distractors and noise_floor must be >= 0")
        if len(self.level) != 2 or not 0 < self.level[0] <= self.level[1] <= 0.5:
            raise ConfigError(
                f"AudioConfig.level must be (min, max) with 0 < min <= max <= 0.5, got {self.level!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_signature(k: int, num_classes: int) -> tuple[float, float, float]:
    """(fundamental Hz, overtone Hz, pulse rate Hz) of class k."""
    f0 = 250.0 * 2.0 ** (4.0 * k / max(1, num_classes))
    return f0, f0 * RATIOS[k % len(RATIOS)], PULSES[(k // len(RATIOS)) % len(PULSES)]


def tone(k: int, num_classes: int, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of class k's signature at unit peak level (random phase)."""
    f0, f1, rate = class_signature(k, num_classes)
    t = np.arange(n) / sr
    phase = rng.uniform(0, 2 * np.pi, 3)
    wave = np.sin(2 * np.pi * f0 * t + phase[0]) + 0.6 * np.sin(2 * np.pi * f1 * t + phase[1])
    pulse = 0.55 + 0.45 * np.sin(2 * np.pi * rate * t + phase[2])
    return (wave * pulse / 1.6).astype(np.float32)


def _envelope(n: int, sr: int) -> np.ndarray:
    """10 ms attack and release: no clicks."""
    ramp = min(n // 2, int(0.01 * sr))
    env = np.ones(n, dtype=np.float32)
    if ramp:
        env[:ramp] = np.linspace(0, 1, ramp)
        env[-ramp:] = np.linspace(1, 0, ramp)
    return env


def _calls(
    out: np.ndarray,
    k: int,
    num_classes: int,
    start: int,
    end: int,
    cfg: AudioConfig,
    rng: np.random.Generator,
) -> None:
    """Add class k's calls over samples [start, end): a loud onset at ``start``, then calls with gaps."""
    sr = cfg.sample_rate
    level = rng.uniform(*cfg.level)
    t, first = start, True
    while t < end:
        n = min(end - t, int(sr * (0.25 if first else rng.uniform(0.2, 0.7))))
        gain = level * (1.6 if first else rng.uniform(0.6, 1.0))
        out[t : t + n] += gain * tone(k, num_classes, n, sr, rng) * _envelope(n, sr)
        t += n + int(sr * rng.uniform(0.05, 0.6))
        first = False


def _distractor(out: np.ndarray, sr: int, rng: np.random.Generator) -> None:
    n = int(sr * rng.uniform(0.08, 0.5))
    at = int(rng.integers(0, max(1, len(out) - n)))
    n = min(n, len(out) - at)
    if rng.random() < 0.5:  # broadband noise burst
        sound = rng.standard_normal(n).astype(np.float32) * 0.5
    else:  # a chirp sweeping across the class bands
        t = np.arange(n) / sr
        f_a, f_b = rng.uniform(200, 6000, 2)
        sound = np.sin(2 * np.pi * (f_a * t + (f_b - f_a) * t**2 / (2 * t[-1] + 1e-9))).astype(np.float32)
    out[at : at + n] += rng.uniform(0.03, 0.2) * sound * _envelope(n, sr)


def render_soundscape(
    cfg: AudioConfig,
    num_classes: int,
    frames: Sequence[tuple[int, Sequence[tuple[int, int]]]],
    rng: np.random.Generator,
) -> np.ndarray:
    """The audio track of one video: ``frames`` in order, each (scene, [(track_id, class_index), ...]).

    Frame i covers samples [i, i + 1) / fps * sample_rate; an object sounds over the frames it is in.
    """
    sr, n_frames = cfg.sample_rate, len(frames)
    spf = sr / cfg.fps
    out = np.zeros(round(n_frames * spf), dtype=np.float32)
    spans: dict[int, list[int]] = {}  # track -> [class, first frame, last frame + 1]
    scenes: dict[int, list[int]] = {}  # scene -> [first frame, last frame + 1]
    for i, (scene, objs) in enumerate(frames):
        scenes.setdefault(scene, [i, i + 1])[1] = i + 1
        for track, cls in objs:
            spans.setdefault(track, [cls, i, i + 1])[2] = i + 1
    muted = {s for s in scenes if rng.random() < cfg.silence}
    scene_of = {i: s for i, (s, _) in enumerate(frames)}
    for track in sorted(spans):
        cls, a, b = spans[track]
        if scene_of[a] in muted or rng.random() >= cfg.audible:
            continue
        _calls(out, cls, num_classes, int(a * spf), int(b * spf), cfg, rng)
    for s, (a, b) in sorted(scenes.items()):
        if s in muted or rng.random() >= cfg.offscreen:
            continue
        seen = {c for i in range(a, b) for _, c in frames[i][1]}
        hidden = [c for c in range(num_classes) if c not in seen]
        if hidden:
            at = int(rng.integers(a, b))
            _calls(
                out, int(rng.choice(hidden)), num_classes, int(at * spf), int(min(b, at + 20) * spf), cfg, rng
            )
    for _ in range(rng.poisson(cfg.distractors * len(out) / sr)):
        _distractor(out, sr, rng)
    out += rng.standard_normal(len(out)).astype(np.float32) * cfg.noise_floor
    return np.clip(out, -1.0, 1.0)
