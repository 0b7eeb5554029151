"""Context-aware LoRA adapters (Polymorph, arXiv 2507.14959; LoRA, Hu et al., ICLR 2022).

Each context gets low-rank deltas on the last ``last_blocks`` blocks of one frozen
backbone plus a classifier head. ``B`` starts at zero, so a fresh adapter is the
identity and starts from the generalist's head. At run time any subset of adapters
is composed in ONE batched forward over shared trunk tokens: batch row ``m`` runs
adapter ``m`` (``compose``). The base weights are never modified, except by the
explicit ``merge_``/``unmerge_`` pair used only by the weight-merging baseline.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.core.lora_targets import TARGETS, target_dims
from polymorphd.models.nn.vit import Block, LoraDeltas, VisionTransformer, ViTConfig, lora_linear


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float = 8.0  # scale = alpha / rank, loralib's convention
    targets: tuple[str, ...] = TARGETS
    last_blocks: int = 2  # the paper adapts only the final blocks: shared trunk tokens stay reusable

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.last_blocks < 1:
            raise ValueError(f"last_blocks must be >= 1, got {self.last_blocks}")
        bad = [t for t in self.targets if t not in TARGETS]
        # a repeated target would be folded twice by merge_ but applied once by the forward
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"LoRA targets {list(self.targets)} invalid: choose distinct names among {list(TARGETS)}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def tail_start(vit_cfg: ViTConfig, lora_cfg: LoRAConfig) -> int:
    """Index of the first adapted block: everything before it is the shared trunk."""
    if lora_cfg.last_blocks > vit_cfg.depth:
        raise ValueError(
            f"LoRA last_blocks {lora_cfg.last_blocks} exceeds the backbone depth {vit_cfg.depth}"
        )
    return vit_cfg.depth - lora_cfg.last_blocks


class ContextAdapter(nn.Module):
    """One context's LoRA pairs on the tail blocks plus a head over all classes.

    The head covers every class so heads stack into one tensor; only the
    context's own classes are trained and read.
    """

    def __init__(self, vit_cfg: ViTConfig, cfg: LoRAConfig, head_init: nn.Linear | None = None) -> None:
        super().__init__()
        self.vit_cfg, self.cfg = vit_cfg, cfg
        self.start = tail_start(vit_cfg, cfg)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        c, h = vit_cfg.embed_dim, int(vit_cfg.embed_dim * vit_cfg.mlp_ratio)
        for name in self.param_names():
            fin, fout = target_dims(name.target, c, h)
            a = torch.empty(cfg.rank, fin)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name.key] = nn.Parameter(a)
            self.lora_B[name.key] = nn.Parameter(torch.zeros(fout, cfg.rank))
        self.head = nn.Linear(vit_cfg.embed_dim, vit_cfg.num_classes)
        if head_init is not None:
            self.head.load_state_dict(head_init.state_dict())

    def param_names(self) -> list[LoraName]:
        return [LoraName(i, t) for i in range(self.start, self.vit_cfg.depth) for t in self.cfg.targets]

    def deltas(self) -> dict[int, LoraDeltas]:
        """Block index -> target -> (A (1, r, in), B*scale (1, out, r))."""
        out: dict[int, dict] = {}
        for n in self.param_names():
            a, b = self.lora_A[n.key], self.lora_B[n.key] * self.cfg.scale
            out.setdefault(n.block, {})[n.target] = (a.unsqueeze(0), b.unsqueeze(0))
        return out


@dataclass(frozen=True)
class LoraName:
    """Stable names: ``blocks.6.attn.qkv`` in ONNX and adapter files, ``b6_attn_qkv`` in torch dicts."""

    block: int
    target: str

    @property
    def key(self) -> str:
        return f"b{self.block}_{self.target.replace('.', '_')}"

    @property
    def onnx(self) -> str:
        return f"blocks.{self.block}.{self.target}"


def stack(adapters: Sequence[ContextAdapter]) -> tuple[dict[int, LoraDeltas], torch.Tensor, torch.Tensor]:
    """Stack adapters for one batched forward: deltas (M, ...), head weights (M, K, C), head biases (M, K)."""
    if not adapters:
        raise ValueError("stack() needs at least one adapter")
    per = [a.deltas() for a in adapters]
    deltas = {
        blk: {
            t: (torch.cat([p[blk][t][0] for p in per]), torch.cat([p[blk][t][1] for p in per]))
            for t in per[0][blk]
        }
        for blk in per[0]
    }
    w = torch.stack([a.head.weight for a in adapters])
    b = torch.stack([a.head.bias for a in adapters])
    return deltas, w, b


def forward_tail(
    vit: VisionTransformer,
    tokens: torch.Tensor,
    start: int,
    deltas: dict[int, LoraDeltas],
    head_w: torch.Tensor,
    head_b: torch.Tensor,
) -> torch.Tensor:
    """Tail blocks with stacked adapters. ``tokens`` (1 or M, N, C) -> logits (M, K), row m = adapter m."""
    m = head_w.shape[0]
    x = tokens.expand(m, -1, -1) if tokens.shape[0] == 1 else tokens
    x = vit.forward_blocks(x, start, vit.cfg.depth, deltas)
    x = vit.norm(x)[:, 0]  # (M, C)
    return torch.einsum("mc,mkc->mk", x, head_w) + head_b


def compose(vit: VisionTransformer, tokens: torch.Tensor, adapters: Sequence[ContextAdapter]) -> torch.Tensor:
    """Run ``adapters`` over shared trunk ``tokens`` (1, N, C) in one batched forward -> (M, K) logits."""
    deltas, w, b = stack(adapters)
    return forward_tail(vit, tokens, adapters[0].start, deltas, w, b)


def cls_block(blk: Block, x: torch.Tensor, lora: LoraDeltas | None = None) -> torch.Tensor:
    """``blk(x, lora)[:, :1]`` computed for the class token only: keys and values need every token, the
    query, projection and MLP only the class token's row. The same numbers (``tests/models/nn/test_lora.py``)
    for about a third of a tail block's FLOPs at 65 tokens: what makes training many tail models on cached
    tokens affordable (the exported graphs run the plain block)."""
    lora = lora or {}
    attn = blk.attn
    b, n, c = x.shape
    qkv = lora_linear(attn.qkv, blk.norm1(x), lora.get("attn.qkv"))
    qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)
    y = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, H, 1, D)
    y = lora_linear(attn.proj, y.transpose(1, 2).reshape(b, 1, c), lora.get("attn.proj"))
    x0 = x[:, :1] + y
    return x0 + blk.mlp(blk.norm2(x0), lora)


def tail_cls_logits(
    blocks: Sequence[Block], norm: nn.Module, head: nn.Module, tokens: torch.Tensor,
    deltas: dict[int, LoraDeltas] | None = None, start: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Tail blocks over trunk tokens, the last one for the class token only, then norm and head -> (B, K)."""
    deltas = deltas or {}
    x = tokens
    for i, blk in enumerate(blocks[:-1]):
        x = blk(x, deltas.get(start + i))
    x = cls_block(blocks[-1], x, deltas.get(start + len(blocks) - 1))
    return head(norm(x)[:, 0])


def adapter_logits(vit: VisionTransformer, tokens: torch.Tensor, adapter: ContextAdapter) -> torch.Tensor:
    """Training path: one adapter over a batch of frames' trunk tokens (B, N, C) -> (B, K)."""
    return tail_cls_logits(
        vit.blocks[adapter.start :], vit.norm, adapter.head, tokens, adapter.deltas(), adapter.start
    )


class AdapterTail(nn.Module):
    """One adapter over cached trunk tokens of a frozen base. The base is held, not registered, so only the
    adapter trains (and DDP syncs only the adapter)."""

    def __init__(self, base: VisionTransformer, adapter: ContextAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self._base = (base,)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return adapter_logits(self._base[0], tokens, self.adapter)


@torch.no_grad()
def merge_(vit: VisionTransformer, adapter: ContextAdapter) -> None:
    """Fold ``adapter`` into ``vit``'s tail weights and head, in place (weight-merging baseline only)."""
    _fold(vit, adapter, sign=1.0)
    vit.head.load_state_dict(adapter.head.state_dict())


@torch.no_grad()
def unmerge_(vit: VisionTransformer, adapter: ContextAdapter, head: nn.Linear) -> None:
    """Undo ``merge_``: subtract the deltas and restore the generalist ``head``."""
    _fold(vit, adapter, sign=-1.0)
    vit.head.load_state_dict(head.state_dict())


def merged_copy(vit: VisionTransformer, adapter: ContextAdapter) -> VisionTransformer:
    """A new model with ``adapter`` merged; ``vit`` is untouched."""
    out = copy.deepcopy(vit)
    merge_(out, adapter)
    return out


def _fold(vit: VisionTransformer, adapter: ContextAdapter, sign: float) -> None:
    for n in adapter.param_names():
        layer: nn.Linear = vit.blocks[n.block].get_submodule(n.target)
        delta = adapter.lora_B[n.key] @ adapter.lora_A[n.key] * adapter.cfg.scale  # (out, in)
        layer.weight.add_(sign * delta)
