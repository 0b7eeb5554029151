"""Analytical FLOPs and parameter counts for the ViT, its exits and the LoRA tail. Torch-free.

Convention (the one ``torch.utils.flop_counter`` uses): a multiply-add is 2
FLOPs, and only matrix products are counted: the patch embedding, every Linear,
attention's ``Q K^T`` and ``A V``, and LoRA's two thin products. LayerNorm,
softmax, GELU, bias and residual adds and pooling are left out everywhere alike
(a few percent of a block at our sizes). Train's report, export's manifest,
eval and bench all count with these functions, so their numbers agree.

Configs are duck-typed (``ViTConfig``, ``ExitConfig``, ``LoRAConfig`` from the
torch modules, or anything with the same fields), so the daemon can import this
module without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from polymorphd.models.core.lora_targets import TARGETS, target_dims

if TYPE_CHECKING:
    from polymorphd.models.nn.exits import ExitConfig
    from polymorphd.models.nn.lora import LoRAConfig
    from polymorphd.models.nn.vit import ViTConfig


def linear_flops(n_tokens: int, fin: int, fout: int) -> int:
    """A Linear over ``n_tokens`` rows."""
    return 2 * n_tokens * fin * fout


def _block(n: int, c: int, hidden: int) -> int:
    linears = sum(linear_flops(n, *target_dims(t, c, hidden)) for t in TARGETS)
    attn = 2 * (2 * n * n * c)  # Q K^T and A V, summed over heads
    return linears + attn


def block_flops(cfg: ViTConfig, n_tokens: int | None = None) -> int:
    """One backbone block (``n_tokens`` defaults to the class token + patch grid)."""
    n = cfg.num_tokens if n_tokens is None else n_tokens
    return _block(n, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))


def embed_flops(cfg: ViTConfig) -> int:
    """Patch embedding: a strided convolution (one Linear per patch), or the conv stem's 3x3 stride-2 convs
    followed by a 1x1 projection (channels as in ``vit.PatchEmbed``)."""
    if cfg.stem == "patch":
        return linear_flops(cfg.grid**2, cfg.in_chans * cfg.patch_size**2, cfg.embed_dim)
    total, ch, side = 0, cfg.in_chans, cfg.img_size
    for i in range(cfg.patch_size.bit_length() - 1):
        out, side = min(cfg.embed_dim, 32 * 2**i), (side + 1) // 2
        total += linear_flops(side * side, ch * 9, out)
        ch = out
    return total + linear_flops(cfg.grid**2, ch, cfg.embed_dim)


def head_flops(cfg: ViTConfig) -> int:
    """The classifier on the class token."""
    return linear_flops(1, cfg.embed_dim, cfg.num_classes)


def blocks_flops(cfg: ViTConfig, start: int, end: int) -> int:
    """Blocks ``start .. end-1`` (``forward_blocks(x, start, end)``)."""
    if not 0 <= start <= end <= cfg.depth:
        raise ValueError(f"block range {start}..{end} is outside 0..{cfg.depth}")
    return (end - start) * block_flops(cfg)


def exit_flops(vit_cfg: ViTConfig, exit_cfg: ExitConfig) -> int:
    """One exit branch: SL-ViT (projection, one narrow block over pooled tokens, head) or MLP."""
    c, k = vit_cfg.embed_dim, vit_cfg.num_classes
    if exit_cfg.kind == "mlp":
        return linear_flops(1, c, exit_cfg.mlp_hidden) + linear_flops(1, exit_cfg.mlp_hidden, k)
    if exit_cfg.kind != "slvit":
        raise ValueError(f"exit kind {exit_cfg.kind!r} invalid: choose 'slvit' or 'mlp'")
    w, t = exit_cfg.width, exit_cfg.pool_grid**2 + 1
    return linear_flops(t, c, w) + _block(t, w, int(w * exit_cfg.mlp_ratio)) + linear_flops(1, w, k)


def lora_flops(cfg: ViTConfig, lora_cfg: LoRAConfig, n_tokens: int | None = None) -> int:
    """One adapter's low-rank deltas over its tail blocks: ``x A^T`` then ``(.) B^T`` per target."""
    n = cfg.num_tokens if n_tokens is None else n_tokens
    c, h = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_block = 0
    for t in lora_cfg.targets:
        fin, fout = target_dims(t, c, h)
        per_block += linear_flops(n, fin, lora_cfg.rank) + linear_flops(n, lora_cfg.rank, fout)
    return lora_cfg.last_blocks * per_block


def tail_flops(cfg: ViTConfig, lora_cfg: LoRAConfig, num_adapters: int) -> int:
    """The batched LoRA tail for ``num_adapters`` adapters: m x (tail blocks + deltas + head)."""
    if num_adapters < 0:
        raise ValueError(f"num_adapters must be >= 0, got {num_adapters}")
    _check_tail(cfg, lora_cfg)
    one = lora_cfg.last_blocks * block_flops(cfg) + lora_flops(cfg, lora_cfg) + head_flops(cfg)
    return num_adapters * one


def full_flops(cfg: ViTConfig) -> int:
    """The whole generalist forward: embedding, every block, head."""
    return embed_flops(cfg) + cfg.depth * block_flops(cfg) + head_flops(cfg)


def count_params(module: Any, trainable_only: bool = False) -> int:
    """Number of parameters of a torch module (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def gflops(flops: float) -> float:
    """FLOPs -> GFLOPs."""
    return flops / 1e9


def bundle_gflops(
    cfg: ViTConfig,
    segment_blocks: Sequence[Sequence[int]],
    exit_cfgs: Iterable[ExitConfig],
    lora_cfg: LoRAConfig,
) -> dict[str, Any]:
    """The manifest's ``gflops`` (docs/bundle.md), per ONNX file of a bundle.

    ``segments[i]``: blocks ``segment_blocks[i]`` (plus the patch embedding for the
    segment starting at block 0); ``exits[i]``: one exit; ``tail``: the generalist
    tail (blocks from the LoRA tail start, norm, head); ``tail_lora_per_adapter``:
    one adapter's row of the batched LoRA tail; ``full``: the whole generalist.
    """
    segments = []
    for start, end in segment_blocks:
        segments.append(gflops(blocks_flops(cfg, start, end) + (embed_flops(cfg) if start == 0 else 0)))
    start = _check_tail(cfg, lora_cfg)
    return {
        "segments": segments,
        "exits": [gflops(exit_flops(cfg, e)) for e in exit_cfgs],
        "tail": gflops(blocks_flops(cfg, start, cfg.depth) + head_flops(cfg)),
        "tail_lora_per_adapter": gflops(tail_flops(cfg, lora_cfg, 1)),
        "full": gflops(full_flops(cfg)),
    }


def frame_gflops(
    g: Mapping[str, Any], *, segments: int, exits: int, tail: bool = False, adapters: int = 0
) -> float:
    """GFLOPs of one frame from what ran: the first ``segments`` segments and ``exits`` exits, the
    generalist tail if ``tail``, and ``adapters`` LoRA-tail rows (``g`` is a manifest's ``gflops``)."""
    if segments > len(g["segments"]) or exits > len(g["exits"]):
        raise ValueError(
            f"ran {segments} segments and {exits} exits, the bundle has {len(g['segments'])} and "
            f"{len(g['exits'])}"
        )
    total = sum(g["segments"][:segments]) + sum(g["exits"][:exits])
    return total + (g["tail"] if tail else 0.0) + adapters * g["tail_lora_per_adapter"]


def _check_tail(cfg: ViTConfig, lora_cfg: LoRAConfig) -> int:
    if lora_cfg.last_blocks > cfg.depth:
        raise ValueError(f"LoRA last_blocks {lora_cfg.last_blocks} exceeds the backbone depth {cfg.depth}")
    return cfg.depth - lora_cfg.last_blocks
