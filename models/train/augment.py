"""Light training augmentation on preloaded uint8 frames, then the runtime's own normalisation.

Frames are loaded once at the model input size as (F, S, S, 3) uint8 BGR. A batch
is augmented in torch (random resized crop, horizontal flip, colour jitter, channel
shuffle; one batched ``grid_sample``) and rounded back to uint8, then normalised by
``models.preprocess.preprocess_batch``: the exact code the daemon runs, so the
network never sees a tensor the runtime could not produce.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from polymorphd.models.core.melspec import LOG_FLOOR
from polymorphd.models.core.preprocess import InputSpec, preprocess_batch
from polymorphd.models.train.presets import Augment

_GRAY_BGR = (0.114, 0.587, 0.299)  # ITU-R 601 luma weights in B, G, R order


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


@dataclass(frozen=True)
class Geometry:
    """Per-frame crop and flip, in grid_sample's normalised coordinates (-1..1, pixel edges at the ends):
    an output point ``u`` shows the input point ``scale * u + shift`` (scale < 0 flips)."""

    scale_x: torch.Tensor  # (B,)
    scale_y: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor


def augment_batch(frames: torch.Tensor, cfg: Augment, gen: torch.Generator) -> torch.Tensor:
    """(B, S, S, 3) uint8 BGR -> augmented (B, S, S, 3) uint8 BGR on the same device.

    Random numbers come from ``gen`` (a CPU generator) so runs are reproducible on any device.
    """
    return augment_geometry(frames, cfg, gen)[0]


def augment_geometry(
    frames: torch.Tensor, cfg: Augment, gen: torch.Generator
) -> tuple[torch.Tensor, Geometry]:
    """``augment_batch`` that also returns the crop/flip it applied (to move boxes alike)."""
    b = frames.shape[0]
    dev = frames.device
    x = frames.permute(0, 3, 1, 2).float()  # (B, 3, S, S)
    # random resized crop as an affine sampling grid: scale = crop side / frame side
    area = _uniform(b, *cfg.scale, gen)
    log_r = _uniform(b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), gen)
    ratio = torch.exp(log_r)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b, generator=gen) < cfg.flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    geom = Geometry(sx * flip, sy, tx, ty)
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # colour jitter: brightness, contrast (around the frame's mean grey), saturation (towards per-pixel grey)
    bright = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen).to(dev).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen).to(dev).view(b, 1, 1, 1)
    sat = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen).to(dev).view(b, 1, 1, 1)
    w = torch.tensor(_GRAY_BGR, device=dev).view(1, 3, 1, 1)
    x = x * bright
    gray = (x * w).sum(1, keepdim=True)  # (B, 1, S, S)
    x = (x - gray) * sat + gray
    mean = gray.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    if cfg.channel_shuffle > 0:
        perms = torch.tensor(list(itertools.permutations(range(3))))
        pick = torch.randint(0, len(perms), (b,), generator=gen)
        pick = torch.where(torch.rand(b, generator=gen) < cfg.channel_shuffle, pick, 0)  # 0: identity
        x = torch.gather(x, 1, perms[pick].to(dev)[:, :, None, None].expand_as(x))
    return x.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), geom


def mixup(
    x: torch.Tensor, *targets: torch.Tensor, alpha: float, gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Blend each sample with another of the batch (Zhang et al. 2018): inputs and every target alike.

    Mixing normalised inputs equals normalising mixed frames (normalisation is affine). Targets are soft
    multi-label vectors (or per-token ones), mixed with the same weight. Returns ``(x, *targets)``.
    """
    if alpha <= 0 or len(x) < 2:
        return (x, *targets)
    # torch's Beta takes no generator: draw it from numpy, seeded by the run's generator
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    j = torch.randperm(len(x), generator=gen).to(x.device)
    return tuple(lam * t + (1 - lam) * t[j] for t in (x, *targets))


def add_sound(mel: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The log-mel of two windows' sounds played together: their mel powers add (``melspec.log_mel`` is
    log(power + floor), so the floor is taken out once). Independent sources, phase ignored."""
    return torch.log(torch.exp(mel) + torch.exp(other) - LOG_FLOOR)


def to_input(frames: torch.Tensor | np.ndarray, spec: InputSpec, device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 BGR -> (B, 3, S, S) float32 normalised RGB on ``device``, via the runtime code."""
    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    return torch.from_numpy(preprocess_batch(np.ascontiguousarray(arr), spec)).to(device)
