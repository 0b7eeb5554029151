"""Audiovisual and regression exits (the multimodal part of SL-ViT: Bakhtiarnia, Zhang, Iosifidis, Neural
Networks 2022, arXiv 2105.09121).

The paper fuses audio into its exit branches and counts crowds with regression exits; its exact fusion layer
is not available here, so this one is designed from first principles and measured (docs/ARCHITECTURE.md,
"Audiovisual and count exits"):

- ``MelFrontEnd``: a window of samples -> log-mel, the numpy front end (``models/core/melspec.py``) as a torch
  module for ONNX (a strided conv with the windowed DFT basis, power, filterbank matmul, log);
- ``AudioEncoder``: log-mel -> non-overlapping time-frequency patches -> one linear projection to the exit's
  width + a learned position per patch: board-light (one small matmul);
- ``AudioVisualExit``: the SL-ViT exit whose single encoder layer attends over its visual tokens AND the
  audio tokens (early fusion inside the exit, the trunk stays visual-only and shared), plus a count head on
  the class token (a ``CountHead`` behind a stop-gradient); with ``mel=None`` it is the visual exit with a count head, the fair baseline;
- ``CountHead``: the count head of the final block (on the final norm's class token) and of every exit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.core.melspec import LOG_FLOOR, MelConfig, dft_basis, mel_filterbank
from polymorphd.models.nn.exits import ExitConfig, SLViTExit
from polymorphd.models.nn.vit import ViTConfig

# log-mel of speech-level audio spans about -14 (silence: log of the floor) to +6: centre and scale it so the
# projection starts in a sane range (a fixed affine map; LayerNorm per patch would erase loud vs silent)
MEL_SHIFT, MEL_SCALE = 4.0, 5.0


class MelFrontEnd(nn.Module):
    """audio (B, samples) float32 -> log-mel (B, n_mels, frames), equal to ``melspec.log_mel``."""

    def __init__(self, cfg: MelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cos, sin = dft_basis(cfg)
        self.bins = cos.shape[0]
        self.register_buffer(
            "basis", torch.from_numpy(np.concatenate([cos, sin]))[:, None]
        )  # (2*bins, 1, n_fft)
        self.register_buffer("fb", torch.from_numpy(mel_filterbank(cfg)))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = F.conv1d(audio[:, None], self.basis, stride=self.cfg.hop)  # (B, 2 * bins, frames)
        re, im = spec[:, : self.bins], spec[:, self.bins :]
        mel = torch.matmul(self.fb, re * re + im * im)  # (B, n_mels, frames)
        return torch.log(mel + LOG_FLOOR)


class AudioEncoder(nn.Module):
    """log-mel (B, n_mels, frames) -> audio tokens (B, P, width)."""

    def __init__(self, cfg: MelConfig, width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.patch_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, width) * 0.02)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        gm, gt = c.n_mels // c.patch_mels, c.frames // c.patch_frames
        x = (mel + MEL_SHIFT) / MEL_SCALE
        x = x.reshape(-1, gm, c.patch_mels, gt, c.patch_frames).permute(0, 1, 3, 2, 4)  # (B, gm, gt, pm, pf)
        return self.proj(x.reshape(-1, gm * gt, c.patch_dim)) + self.pos_embed  # (B, P, W)


class AudioVisualExit(SLViTExit):
    """SL-ViT exit over [class token, pooled patches, audio tokens] with a label head and a count head."""

    def __init__(
        self,
        vit: ViTConfig,
        cfg: ExitConfig,
        mel: MelConfig | None,
        count: bool = True,
        fused_attn: bool = True,
        count_grad: float = 0.0,
    ) -> None:
        super().__init__(vit, cfg, fused_attn)
        if not 0.0 <= count_grad <= 1.0:
            raise ValueError(
                f"count_grad is a share of the count loss's gradient in [0, 1], got {count_grad}"
            )
        if cfg.kind != "slvit":
            raise ValueError(f"an audiovisual exit is an SL-ViT exit, got kind {cfg.kind!r}")
        self.mel = mel
        self.audio = AudioEncoder(mel, cfg.width) if mel is not None else None
        # the count reads the exit's class token through a stop-gradient: trained into the shared layers, its
        # L1 term cost the exit 0.05 mAP after block 2 (issue 14c, bench/avexits_recipe.py); an MLP as the
        # final's, since a linear read-out of features it may not shape is too weak a counter
        self.count_head = CountHead(cfg.width) if count else None
        # training only: the share of the count loss's gradient that reaches the exit's layer (0: the
        # stop-gradient above); the forward value is the same at any share
        self.count_grad = count_grad

    def forward_all(
        self, tokens: torch.Tensor, mel: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(label logits (B, K), count (B,) or None)."""
        x = self.embed(tokens)
        if self.audio is not None:
            if mel is None:
                raise ValueError("this exit fuses audio: pass the frame's log-mel window")
            x = torch.cat([x, self.audio(mel)], dim=1)  # (B, 1 + p*p + P, W)
        z = self.norm(self.block(x))[:, 0]
        g = self.count_grad
        zc = z.detach() if g == 0.0 else z if g == 1.0 else z.detach() + g * (z - z.detach())
        count = self.count_head(zc) if self.count_head is not None else None
        return self.head(z), count

    def forward(self, tokens: torch.Tensor, mel: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_all(tokens, mel)[0]


class CountHead(nn.Module):
    """The final block's count: a small MLP on the final norm's class token (B, C) -> (B,)."""

    def __init__(self, embed_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(feat)))[:, 0]
