"""``train --recipe polymorph``: the Polymorph method's own setting (arXiv 2507.14959, Sec. 3).

One backbone, shared and frozen (the pretrained checkpoint). On top of it, at the same per-frame cost:

- the generalist: one LoRA of the adapters' rank on the tail blocks plus one head over all classes;
- per context, an adapter: a LoRA of that rank plus a head over the context's classes, trained on the
  context's frames with negatives drawn from the other contexts' frames;
- the strongest single model at that cost (reported, not exported): the tail blocks fully fine-tuned with
  a head over all classes, so the comparison is not against a strawman.

Every model trains on the frozen trunk's cached tokens at the tail start, with manifold mixup, the same
schedule and learning rate: an adapter ``preset.adapters.epochs`` epochs of ``EPOCH_SAMPLES`` samples, the
generalist and the full-tail model epochs of (number of contexts) x ``EPOCH_SAMPLES``, so that each all-class
model costs what all the adapters cost together (one adapter's budget left the generalist unconverged:
docs/ARCHITECTURE.md). Each keeps its best epoch by calibration mAP on its own classes. The generalist's LoRA is
merged into the exported backbone (``tail.onnx``, the ``full`` and ``early-exit`` modes); the adapters stay
relative to the frozen backbone, whose tail weights ``tail_lora.onnx`` and ``tail_weights.onnx`` carry
(``run.ADAPTER_BASE``; docs/bundle.md).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.core.calibrate import decision_thresholds
from polymorphd.models.core.metrics import label_quality, mean_average_precision
from polymorphd.models.nn.lora import AdapterTail, ContextAdapter, tail_cls_logits, tail_start
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train.augment import mixup
from polymorphd.models.train.loop import (
    Ctx,
    KeepBest,
    SplitData,
    fit,
    freeze,
    frozen_features,
    jsonable,
    stage_bar,
)
from polymorphd.models.train.presets import Preset, Schedule

log = logging.getLogger(__name__)

EPOCH_SAMPLES = 2048  # samples per epoch for every model of the recipe: equal optimizer steps for each
EVAL_ROWS = 512


class FullTail(nn.Module):
    """The tail blocks, final norm and a head, all trainable: the strongest single model at the tail's cost."""

    def __init__(self, base: VisionTransformer, start: int) -> None:
        super().__init__()
        vit = copy.deepcopy(base)
        self.blocks = nn.ModuleList(vit.blocks[start:])
        self.norm, self.head = vit.norm, vit.head
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tail_cls_logits(self.blocks, self.norm, self.head, tokens)


@dataclass
class Tokens:
    """The frozen trunk's tokens at the tail start for the three splits, and their targets."""

    train: torch.Tensor
    calib: torch.Tensor
    report: torch.Tensor
    Y: torch.Tensor  # train targets, float, on the device


def cache_tokens(base: VisionTransformer, start: int, train: SplitData, calib: SplitData, report: SplitData, ctx: Ctx) -> Tokens:  # fmt: skip
    freeze(base)
    feats = [frozen_features(base, s.images, ctx, [start])[0][start] for s in (train, calib, report)]
    return Tokens(*feats, torch.from_numpy(train.Y).float().to(ctx.device))


@torch.no_grad()
def probabilities(model: nn.Module, tokens: torch.Tensor) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(tokens[i : i + EVAL_ROWS])) for i in range(0, len(tokens), EVAL_ROWS)]
    return torch.cat(out).cpu().numpy().astype(np.float64)


def epoch_pool(
    Y: np.ndarray,
    classes: Sequence[int] | None,
    negative_ratio: float,
    seed: Sequence[int],
    samples: int | None = None,
) -> Callable[[int], torch.Tensor]:
    """Epoch -> ``samples`` (default ``EPOCH_SAMPLES``) frame indices. All classes: a uniform draw of all frames. A context's
    classes: its frames (any of its classes present) and ``negative_ratio`` negatives per positive from the
    other frames, drawn with replacement only where a pool is smaller than its share."""
    n, samples = len(Y), samples or EPOCH_SAMPLES
    if classes is None:
        pos, neg = np.arange(n), np.zeros(0, dtype=np.int64)
    else:
        present = Y[:, list(classes)].any(axis=1)
        pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
    n_neg = 0 if not len(neg) or not len(pos) else round(samples * negative_ratio / (1 + negative_ratio))
    n_pos = samples - n_neg

    def draw(epoch: int) -> torch.Tensor:
        rng = np.random.default_rng([*seed, epoch])
        parts = [rng.choice(pos, n_pos, replace=n_pos > len(pos))] if len(pos) else []
        if n_neg:
            parts.append(rng.choice(neg, n_neg, replace=n_neg > len(neg)))
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))

    return draw


def train_model(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    tok: Tokens,
    calib: SplitData,
    classes: Sequence[int] | None,
    seed: Sequence[int],
    ctx: Ctx,
    desc: str,
    bar,
    scale: int = 1,
    keep_start: bool = False,
) -> dict:
    """One recipe model on the cached tokens, its classes only in the loss; keeps its best calibration epoch.
    ``scale``: epochs of ``scale`` x ``EPOCH_SAMPLES`` samples (the all-class models: the adapters' total).
    ``keep_start``: the model as given is epoch 0 and is kept when no epoch beats it (a warm start)."""
    p = ctx.preset
    cols = list(range(tok.Y.shape[1])) if classes is None else list(classes)
    cls = torch.tensor(cols, device=tok.Y.device)
    gen = torch.Generator().manual_seed(int(np.random.default_rng(list(seed)).integers(2**31)))
    pool = epoch_pool(tok.Y.cpu().numpy(), classes, p.negative_ratio, seed, scale * EPOCH_SAMPLES)

    def step(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(tok.Y.device)
        x, y = mixup(tok.train[idx], tok.Y[idx][:, cls], alpha=p.augment.mixup_alpha, gen=gen)
        return F.binary_cross_entropy_with_logits(model(x)[:, cls], y)

    def score() -> float:
        return mean_average_precision(calib.Y[:, cols], probabilities(model, tok.calib)[:, cols])[0]

    keep = KeepBest(model, score() if keep_start else None)

    def select(epoch: int) -> None:
        keep.update(score(), epoch)
        model.train()

    model.train()
    losses = fit(params, pool, step, p.adapters, ctx, desc, bar, on_epoch_end=select)
    keep.restore()
    model.eval()
    return {
        "best_epoch": keep.epoch,
        "map_calibration": jsonable(keep.score),
        "final_loss": jsonable(losses[-1]),
        "budget": budget(ctx, scale),
    }


# The recipe's schedule for every model (generalist LoRA, adapters, full tail): 4 x 2048 samples = 128 steps
# of 64. Sized to the compute: on the shared 2-core machine one step of a one-block tail costs ~0.2 s, and a
# run trains 12-16 adapters besides the generalist and the full-tail model (docs/ARCHITECTURE.md).
ADAPTER_SCHEDULE = Schedule(epochs=4, lr=2e-3, batch_size=64, weight_decay=0.01)
MAX_CONTEXT_SIZE = (
    14  # the tao profile's contexts hold 10-12 classes plus hubs: clustering may keep them whole
)
# adapters start from the generalist's LoRA and head (train_adapters): measured in docs/ARCHITECTURE.md
# ("The method in its own setting", warm start)
WARM_START = False
LORA_LAST_BLOCKS = 1  # LoRA (and the full-tail model) on the last block: half the tail cost of two


def recipe_preset(preset: Preset) -> Preset:
    """The preset as the recipe trains it: its model and exits; the recipe's schedule, context size and
    LoRA blocks (at most the preset's)."""
    blocks = min(LORA_LAST_BLOCKS, preset.lora_last_blocks)
    return replace(
        preset, adapters=ADAPTER_SCHEDULE, max_context_size=MAX_CONTEXT_SIZE, lora_last_blocks=blocks
    )


def budget(ctx: Ctx, scale: int = 1) -> dict:
    """A recipe model's training budget: one adapter's at ``scale`` 1, the adapters' total at their count."""
    s = ctx.preset.adapters
    return {
        "epochs": s.epochs, "samples_per_epoch": scale * EPOCH_SAMPLES, "batch_size": s.batch_size, "lr": s.lr,
        "steps": s.epochs * math.ceil(scale * EPOCH_SAMPLES / s.batch_size),
    }  # fmt: skip


def train_generalist(
    base: VisionTransformer, train: SplitData, calib: SplitData, report: SplitData, ctx: Ctx, scale: int = 1
) -> tuple[ContextAdapter, dict]:
    """The generalist: one LoRA (the adapters' rank) + one head over all classes, on the frozen ``base``,
    trained for ``scale`` adapters' budgets (the run passes its number of contexts: equal total budget)."""
    lora_cfg = ctx.preset.lora_config()
    start = tail_start(base.cfg, lora_cfg)
    tok = cache_tokens(base, start, train, calib, report, ctx)
    torch.manual_seed(ctx.seed * 100 + 7)
    adapter = ContextAdapter(base.cfg, lora_cfg, head_init=base.head).to(ctx.device)
    model = AdapterTail(base, adapter)
    bar = stage_bar("generalist (LoRA)", ctx)
    res = train_model(
        model,
        list(adapter.named_parameters()),
        tok,
        calib,
        None,
        [ctx.seed, 0x6E],
        ctx,
        "generalist",
        bar,
        scale,
    )
    bar.close()
    probs = probabilities(model, tok.report)
    thr = decision_thresholds(
        calib.Y, probabilities(model, tok.calib), min_positives=ctx.preset.threshold_min_positives
    )
    res |= {"map": jsonable(mean_average_precision(report.Y, probs)[0])}
    res |= {k: jsonable(v) for k, v in label_quality(probs > thr, report.Y).items()}
    return adapter, res


@torch.no_grad()
def generalist_lora(base: VisionTransformer, generalist: VisionTransformer, lora_cfg) -> ContextAdapter:
    """The generalist's LoRA and head as a ContextAdapter on ``base``, recovered from the merged weights: each
    tail weight's difference from the base has rank <= r, so its truncated SVD gives factors whose product is
    that difference (to float precision). A warm start for the adapters and the continued generalist."""
    adapter = ContextAdapter(base.cfg, lora_cfg, head_init=generalist.head)
    for n in adapter.param_names():
        w0 = base.blocks[n.block].get_submodule(n.target).weight
        w1 = generalist.blocks[n.block].get_submodule(n.target).weight
        u, sv, vh = torch.linalg.svd((w1 - w0).double(), full_matrices=False)
        r = lora_cfg.rank
        root = sv[:r].sqrt()
        adapter.lora_A[n.key].copy_((root[:, None] * vh[:r]).float())
        adapter.lora_B[n.key].copy_((u[:, :r] * root / lora_cfg.scale).float())
    return adapter


def _continued_generalist(
    base: VisionTransformer, warm: ContextAdapter, tok: Tokens, calib: SplitData, scale: int, ctx: Ctx, bar
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The generalist trained on for the warm adapters' total budget (``scale`` adapter budgets), from its own
    weights (epoch 0 kept if nothing beats it): the fair comparison for adapters that start from it."""
    torch.manual_seed(ctx.seed * 100 + 77)
    adapter = copy.deepcopy(warm)
    model = AdapterTail(base, adapter)
    res = train_model(
        model, list(adapter.named_parameters()), tok, calib, None, [ctx.seed, 0x6F], ctx, "generalist (more)",
        bar, scale, keep_start=True,
    )  # fmt: skip
    return probabilities(model, tok.report), probabilities(model, tok.calib), res


def _full_tail(
    base: VisionTransformer, start: int, tok: Tokens, calib: SplitData, scale: int, ctx: Ctx, bar
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The tail blocks fully fine-tuned on all classes at the adapters' total budget: report and calibration
    probabilities and its training record."""
    torch.manual_seed(ctx.seed * 100 + 99)
    full = FullTail(base, start).to(ctx.device)
    res = train_model(
        full, list(full.named_parameters()), tok, calib, None, [ctx.seed, 0xF7], ctx, "full tail", bar, scale
    )
    return probabilities(full, tok.report), probabilities(full, tok.calib), res


def _ctx_map(Y: np.ndarray, P: np.ndarray, classes: Sequence[int]) -> float | None:
    return jsonable(mean_average_precision(Y[:, list(classes)], P[:, list(classes)])[0])


def train_adapters(
    base: VisionTransformer,
    generalist: VisionTransformer,
    contexts: list[list[int]],
    train: SplitData,
    calib: SplitData,
    report: SplitData,
    ctx: Ctx,
    full_tail: bool = True,
    warm_start: bool | None = None,
) -> tuple[list[ContextAdapter], dict]:
    """One adapter per context on the frozen ``base``, and (``full_tail``) the full-tail single model; per context the mAP
    on its classes (all report frames) of the generalist, the adapter and the full-tail model.

    ``warm_start`` (default ``WARM_START``): each adapter starts from the generalist's LoRA and head (epoch 0
    is the generalist, kept when no epoch beats it on the calibration split), and the generalist trains on
    for the adapters' total budget (``map_generalist_continued``: both sides spend the same), else from
    a fresh LoRA with the generalist's head.

    Raises if ``base`` changes: the backbone must stay frozen.
    """
    warm_start = WARM_START if warm_start is None else warm_start
    lora_cfg = ctx.preset.lora_config()
    start = tail_start(base.cfg, lora_cfg)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tok = cache_tokens(base, start, train, calib, report, ctx)
    freeze(generalist)
    gen_tail = AdapterTail(generalist, ContextAdapter(generalist.cfg, lora_cfg, head_init=generalist.head))
    gen_probs = probabilities(gen_tail, tok.report)  # a fresh LoRA is the identity: the merged generalist
    gen_cal = probabilities(gen_tail, tok.calib)
    warm = generalist_lora(base, generalist, lora_cfg).to(ctx.device) if warm_start else None
    bar = stage_bar("adapters", ctx)
    adapters, rows = [], []
    everywhere = np.zeros_like(gen_probs)  # each class scored by its contexts' adapters (mean), all frames
    everywhere_cal = np.zeros_like(gen_cal)
    covered = np.zeros(gen_probs.shape[1])
    for ci, classes in enumerate(contexts):
        torch.manual_seed(ctx.seed * 100 + ci)
        if warm is None:
            adapter = ContextAdapter(base.cfg, lora_cfg, head_init=generalist.head).to(ctx.device)
        else:
            adapter = copy.deepcopy(warm)
        model = AdapterTail(base, adapter)
        res = train_model(
            model, list(adapter.named_parameters()), tok, calib, classes, [ctx.seed, ci, 0xAD], ctx,
            f"context {ci + 1}/{len(contexts)}", bar, keep_start=warm is not None,
        )  # fmt: skip
        probs, cal = probabilities(model, tok.report), probabilities(model, tok.calib)
        everywhere[:, classes] += probs[:, classes]
        everywhere_cal[:, classes] += cal[:, classes]
        covered[classes] += 1
        adapters.append(adapter.eval())
        rows.append(
            res | {
                "context": ci, "classes": list(classes),
                "train_frames": int(train.Y[:, classes].any(axis=1).sum()),
                "map_generalist": _ctx_map(report.Y, gen_probs, classes),
                "map_adapter": _ctx_map(report.Y, probs, classes),
            }
        )  # fmt: skip
    if full_tail:
        full_probs, full_cal, full_res = _full_tail(base, start, tok, calib, len(contexts), ctx, bar)
    if warm is not None:
        more_probs, more_cal, more_res = _continued_generalist(
            base, warm, tok, calib, len(contexts), ctx, bar
        )
    bar.close()
    for r in rows:
        r["map_full_tail"] = _ctx_map(report.Y, full_probs, r["classes"]) if full_tail else None
        if warm is not None:
            r["map_generalist_continued"] = _ctx_map(report.Y, more_probs, r["classes"])
    for k, v in base.state_dict().items():
        if not torch.equal(v, before[k]):
            raise RuntimeError(
                f"backbone tensor {k} changed during adapter training; the base must stay frozen"
            )
    n = ctx.preset.threshold_min_positives
    seen = covered > 0
    everywhere[:, seen] /= covered[seen]
    everywhere_cal[:, seen] /= covered[seen]
    everywhere[:, ~seen], everywhere_cal[:, ~seen] = gen_probs[:, ~seen], gen_cal[:, ~seen]

    def overall(probs: np.ndarray, cal: np.ndarray) -> dict:
        thr = decision_thresholds(calib.Y, cal, min_positives=n)
        out = {"map": jsonable(mean_average_precision(report.Y, probs)[0])}
        return out | {k: jsonable(v) for k, v in label_quality(probs > thr, report.Y).items()}

    summary = {
        "generalist": overall(gen_probs, gen_cal),
        "adapters_everywhere": overall(everywhere, everywhere_cal),
        **({"full_tail": overall(full_probs, full_cal) | full_res} if full_tail else {}),
        **({"generalist_continued": overall(more_probs, more_cal) | more_res} if warm is not None else {}),
        "warm_start": warm is not None,
        "budget_per_adapter": budget(ctx),
    }
    return adapters, {"adapters": rows, "recipe": summary}
