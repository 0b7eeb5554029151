"""The bundle's graphs as torch modules, one per ONNX file (docs/bundle.md).

Each wraps the model's own forward pieces (``forward_embed``, ``forward_blocks``, ``forward_head``,
``lora.forward_tail``), so the exported graph runs exactly the code training ran. The tail graphs take
their per-block tensors as flat positional inputs (ONNX graph inputs), in the order of ``names``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.nn.audio import AudioVisualExit, CountHead
from polymorphd.models.nn.lora import LoraName, forward_tail
from polymorphd.models.nn.vit import VisionTransformer

Pairs = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # block -> target -> two tensors


def _by_block(names: list[LoraName], flat: tuple[torch.Tensor, ...]) -> Pairs:
    """Flat inputs (two per name, in ``names`` order) -> block -> target -> (first, second)."""
    out: Pairs = {}
    for i, n in enumerate(names):
        out.setdefault(n.block, {})[n.target] = (flat[2 * i], flat[2 * i + 1])
    return out


class Segment(nn.Module):
    """``segment_i.onnx``: blocks ``start .. end-1``, after the patch embedding when ``start`` is 0."""

    def __init__(self, vit: VisionTransformer, start: int, end: int) -> None:
        super().__init__()
        self.vit, self.start, self.end = vit, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0:
            x = self.vit.forward_embed(x)
        return self.vit.forward_blocks(x, self.start, self.end)


class Probs(nn.Module):
    """``exit_i.onnx``: an exit's logits as probabilities."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.inner(tokens))


class Tail(nn.Module):
    """``tail.onnx``: the generalist tail, blocks from ``start``, norm and head."""

    def __init__(self, vit: VisionTransformer, start: int) -> None:
        super().__init__()
        self.vit, self.start = vit, start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_blocks(tokens, self.start, self.vit.cfg.depth)
        return torch.sigmoid(self.vit.forward_head(x))


class TailLora(nn.Module):
    """``tail_lora.onnx``: the batched multi-adapter tail; inputs tokens, (A, B) per name, head_w, head_b."""

    def __init__(self, vit: VisionTransformer, start: int, names: list[LoraName]) -> None:
        super().__init__()
        self.vit, self.start, self.names = vit, start, names

    def forward(self, tokens: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        deltas = _by_block(self.names, flat)
        head_w, head_b = flat[-2], flat[-1]
        return torch.sigmoid(forward_tail(self.vit, tokens, self.start, deltas, head_w, head_b))


class TailWeights(nn.Module):
    """``tail_weights.onnx``: the tail with its linear weights and head as inputs: tokens, (w, b) per name,
    head_w, head_b (the merged baseline feeds W + B A)."""

    def __init__(self, vit: VisionTransformer, start: int, names: list[LoraName]) -> None:
        super().__init__()
        self.vit, self.start, self.names = vit, start, names

    def forward(self, tokens: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_blocks(
            tokens, self.start, self.vit.cfg.depth, weights=_by_block(self.names, flat)
        )
        return torch.sigmoid(self.vit.forward_head(x, lambda pooled: F.linear(pooled, flat[-2], flat[-1])))


class AudioExit(nn.Module):
    """``exit_i.onnx`` of an audiovisual exit with a count head: (tokens, mel) -> (probs, count)."""

    def __init__(self, inner: AudioVisualExit) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, count = self.inner.forward_all(tokens, mel)
        assert count is not None, "AudioExit needs an exit with a count head"
        return torch.sigmoid(logits), count


class TailCount(nn.Module):
    """The generalist tail with the final block's count head: tokens -> (probs, count)."""

    def __init__(self, vit: VisionTransformer, start: int, count: CountHead) -> None:
        super().__init__()
        self.vit, self.start, self.count = vit, start, count

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.vit.forward_blocks(tokens, self.start, self.vit.cfg.depth)
        return torch.sigmoid(self.vit.forward_head(x)), self.count(self.vit.norm(x)[:, 0])
