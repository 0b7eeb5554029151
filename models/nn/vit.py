"""Vision Transformer backbone (Dosovitskiy et al., ICLR 2021), cut at block seams.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``head``) so a timm checkpoint loads directly and ONNX/adapter tensor
names stay stable. The forward is split into ``forward_embed``,
``forward_blocks(x, start, end)`` and ``forward_head``: export segments are cut
exactly at these seams, so the torch model and the ONNX bundle share one
decomposition.

Every block accepts an optional ``lora`` mapping (see ``models/nn/lora.py``): stacked
low-rank deltas applied beside the frozen base weights, one adapter per batch row; and an
optional ``weights`` mapping that replaces a linear's own weight and bias by given tensors
(``tail_weights.onnx`` takes them as graph inputs, ``models/nn/graphs.py``). Linear names are
``models/core/lora_targets.py``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# target name -> (A, B): A (M|1, r, in), B (M|1, out, r) with the LoRA scale folded into B.
LoraDeltas = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
# target name -> (weight (out, in), bias (out)): used instead of the linear's own parameters. Plain tensors
# rather than torch.func.functional_call, because functional_call does not trace to ONNX.
LinearWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def lora_linear(
    base: nn.Linear,
    x: torch.Tensor,
    ab: tuple[torch.Tensor, torch.Tensor] | None,
    wb: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``base(x)`` (``wb`` replaces its weight and bias) plus the low-rank delta ``x A^T B^T`` (batch row m
    uses adapter m, or one for all)."""
    y = base(x) if wb is None else F.linear(x, *wb)
    if ab is None:
        return y
    a, b = ab
    return y + torch.matmul(torch.matmul(x, a.transpose(-1, -2)), b.transpose(-1, -2))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        # fused (SDPA) trains faster; the explicit softmax exports to the plainest ONNX graph.
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, lora: LoraDeltas | None = None, weights: LinearWeights | None = None
    ) -> torch.Tensor:
        lora, weights = lora or {}, weights or {}
        b, n, c = x.shape
        qkv = lora_linear(self.qkv, x, lora.get("attn.qkv"), weights.get("attn.qkv"))
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return lora_linear(self.proj, x, lora.get("attn.proj"), weights.get("attn.proj"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(
        self, x: torch.Tensor, lora: LoraDeltas | None = None, weights: LinearWeights | None = None
    ) -> torch.Tensor:
        lora, weights = lora or {}, weights or {}
        x = self.act(lora_linear(self.fc1, x, lora.get("mlp.fc1"), weights.get("mlp.fc1")))
        return lora_linear(self.fc2, x, lora.get("mlp.fc2"), weights.get("mlp.fc2"))


class Block(nn.Module):
    """Pre-norm transformer encoder layer (timm's ``Block`` without layer scale or drop path)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, fused)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, lora: LoraDeltas | None = None, weights: LinearWeights | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lora, weights)
        return x + self.mlp(self.norm2(x), lora, weights)


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 64  # small frames: the board classifies whole scenes, not fine detail
    patch_size: int = 8
    in_chans: int = 3
    num_classes: int = 32
    embed_dim: int = 192
    depth: int = 8
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6  # timm's value; Hugging Face uses 1e-12 (the converter carries it over)
    # "patch": timm's single strided conv (checkpoints load). "conv": a stack of 3x3 stride-2 convs before the
    # patch projection (Xiao et al., NeurIPS 2021, "Early Convolutions Help Transformers See Better"): trained
    # from scratch on a few thousand frames, a plain ViT memorises scenes (train mAP 0.99, test 0.26 on the
    # synthetic default); the conv stem gives it the locality prior it lacks
    stem: str = "patch"

    def __post_init__(self) -> None:
        # positivity first: the divisibility checks below would divide by zero
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mlp_ratio", "ln_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem {self.stem!r} invalid: choose 'patch' or 'conv'")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"a conv stem needs a power-of-two patch_size, got {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.stem == "patch":
            self.stem = None
            self.proj = nn.Conv2d(
                cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
            )
            return
        layers, ch = [], cfg.in_chans
        for i in range(cfg.patch_size.bit_length() - 1):  # 3x3 stride-2 convs down to the patch grid
            out = min(cfg.embed_dim, 32 * 2**i)  # 32, 64, 128, ...
            layers += [nn.Conv2d(ch, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            ch = out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(ch, cfg.embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, fused_attn: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, c) * 0.02)
        self.blocks = nn.ModuleList(
            Block(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.ln_eps, fused_attn)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(c, eps=cfg.ln_eps)
        self.head = nn.Linear(c, cfg.num_classes)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def set_fused_attn(self, fused: bool) -> None:
        for blk in self.blocks:
            blk.attn.fused = fused

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> tokens (B, 1 + N, C), class token first."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_blocks(
        self,
        x: torch.Tensor,
        start: int,
        end: int,
        lora: Mapping[int, LoraDeltas] | None = None,
        weights: Mapping[int, LinearWeights] | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start .. end-1``; ``lora`` maps a block index to that block's stacked deltas,
        ``weights`` to the linear weights it runs with instead of its own."""
        if not 0 <= start <= end <= len(self.blocks):
            raise ValueError(f"block range {start}..{end} is outside 0..{len(self.blocks)}")
        for i in range(start, end):
            x = self.blocks[i](x, (lora or {}).get(i), (weights or {}).get(i))
        return x

    def forward_head(
        self, x: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Final norm, class-token pooling, classifier (``head`` overrides the generalist's)."""
        x = self.norm(x)[:, 0]  # (B, C)
        return (head or self.head)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_blocks(self.forward_embed(x), 0, len(self.blocks)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
