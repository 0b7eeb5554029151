"""Early-exit branches (SL-ViT: Bakhtiarnia, Zhang, Iosifidis, Neural Networks 2022, arXiv 2105.09121).

The SL-ViT exit reads the tokens after block ``after_block``, pools the patch
tokens to a small grid (the class token is kept), projects them to a narrower
width, runs ONE transformer encoder layer, normalises and classifies from the
class token. The MLP exit on the class token is the conventional baseline the
paper compares against. Both are trained with the backbone frozen; ``copycat``
distillation targets the final classifier's probabilities (``models/train/train.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.nn.vit import Block, ViTConfig

ExitKind = Literal["slvit", "mlp"]


@dataclass(frozen=True)
class ExitConfig:
    after_block: int  # tokens after this many blocks (forward_blocks(x, 0, after_block))
    kind: ExitKind = "slvit"
    width: int = 96  # narrow: an exit must cost a small fraction of a backbone block
    num_heads: int = 2
    pool_grid: int = 2  # patch tokens pooled to pool_grid x pool_grid (+ the class token)
    mlp_ratio: float = 2.0
    mlp_hidden: int = 256  # MLP exit only

    def __post_init__(self) -> None:
        if self.kind not in ("slvit", "mlp"):
            raise ValueError(f"exit kind {self.kind!r} invalid: choose 'slvit' or 'mlp'")
        if self.after_block < 1:
            raise ValueError(f"after_block must be >= 1, got {self.after_block}")
        for name in ("width", "num_heads", "pool_grid", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"exit {name} must be >= 1, got {getattr(self, name)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"exit mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.width % self.num_heads:
            raise ValueError(f"exit width {self.width} is not divisible by num_heads {self.num_heads}")

    def validate(self, vit: ViTConfig) -> None:
        if self.after_block >= vit.depth:
            raise ValueError(
                f"exit after_block {self.after_block} must be below the backbone depth {vit.depth}"
            )
        if self.pool_grid > vit.grid:
            raise ValueError(f"exit pool_grid {self.pool_grid} exceeds the token grid {vit.grid}")
        if self.kind == "slvit" and vit.grid % self.pool_grid:
            raise ValueError(f"exit pool_grid {self.pool_grid} must divide the token grid {vit.grid}")

    @property
    def num_tokens(self) -> int:
        return self.pool_grid**2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


class SLViTExit(nn.Module):
    def __init__(self, vit: ViTConfig, cfg: ExitConfig, fused_attn: bool = True) -> None:
        super().__init__()
        cfg.validate(vit)
        self.cfg, self.grid = cfg, vit.grid
        self.proj = nn.Linear(vit.embed_dim, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        self.block = Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, eps=vit.ln_eps, fused=fused_attn)
        self.norm = nn.LayerNorm(cfg.width, eps=vit.ln_eps)
        self.head = nn.Linear(cfg.width, vit.num_classes)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Trunk tokens (B, N, C) -> the exit's visual tokens (B, 1 + p*p, W): class token + pooled grid."""
        b, _, c = tokens.shape
        cls, patches = tokens[:, :1], tokens[:, 1:]
        grid = patches.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # (B, C, g, g)
        # the grid divides evenly in every preset, so adaptive pooling is a plain average pool (exports cleanly)
        k = self.grid // self.cfg.pool_grid
        pooled = F.avg_pool2d(grid, k, k).flatten(2).transpose(1, 2)  # (B, p*p, C)
        return self.proj(torch.cat([cls, pooled], dim=1)) + self.pos_embed  # (B, 1 + p*p, W)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.block(self.embed(tokens)))[:, 0]
        return self.head(x)


class MLPExit(nn.Module):
    def __init__(self, vit: ViTConfig, cfg: ExitConfig) -> None:
        super().__init__()
        cfg.validate(vit)
        self.cfg = cfg
        self.norm = nn.LayerNorm(vit.embed_dim, eps=vit.ln_eps)
        self.fc1 = nn.Linear(vit.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.head = nn.Linear(cfg.mlp_hidden, vit.num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc1(self.norm(tokens[:, 0]))))


def build_exit(vit: ViTConfig, cfg: ExitConfig, fused_attn: bool = True) -> nn.Module:
    if cfg.kind == "slvit":
        return SLViTExit(vit, cfg, fused_attn)
    return MLPExit(vit, cfg)
