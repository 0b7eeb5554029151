"""The training loop shared by every stage: data holders, AdamW with warmup + cosine, model selection on
the calibration split, and frozen-trunk passes that cache tokens for the frozen-backbone stages."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train.augment import add_sound, augment_geometry, mixup, to_input
from polymorphd.models.train.boxaug import move_boxes, paste_objects, patch_targets
from polymorphd.models.train.distributed import DistEnv, epoch_order, mean_across
from polymorphd.models.train.presets import Preset, Schedule

log = logging.getLogger(__name__)

EVAL_BATCH = 256


@dataclass
class SplitData:
    """One split's annotated frames, preloaded at the model input size."""

    name: str
    images: np.ndarray  # (F, S, S, 3) uint8 BGR
    Y: np.ndarray  # (F, K) uint8 multi-hot
    video_ids: np.ndarray  # (F,) each frame's video, frames stored video by video (exit calibration splits)
    boxes: list[np.ndarray] | None = None  # per frame (n, 5) [class column, x0, y0, x1, y1] at input size
    counts: np.ndarray | None = None  # (F,) float32 objects (annotations) per frame
    mel: np.ndarray | None = (
        None  # (F, n_mels, frames) float32 log-mel of each frame's audio window, if asked
    )

    @property
    def videos(self) -> int:
        return len(np.unique(self.video_ids))


@dataclass
class View:
    """One augmented batch: inputs (B, 3, S, S), soft targets (B, K), patch targets (B, N, K) or None, and
    for a split with sound (``SplitData.mel``) each sample's log-mel (B, n_mels, frames) and count (B,)."""

    x: torch.Tensor
    y: torch.Tensor
    tokens: torch.Tensor | None = None
    mel: torch.Tensor | None = None
    count: torch.Tensor | None = None


class Batches:
    """Augmented training batches of one split: copy-paste, crop/flip/colour, runtime normalisation, mixup.

    With boxes (the train split), also per-patch-token targets for token labelling (``tokens=True``). With
    sound and counts (``SplitData.mel``, ``counts``), ``view`` keeps them consistent with the picture: a pasted
    object brings its frame's sound (``add_sound``), the count gains or loses the boxes that paste and crop
    add or remove, and mixup blends log-mel and count with the same weight as the frames and labels.
    """

    def __init__(self, data: SplitData, ctx: Ctx, seed: int, tokens: bool = False) -> None:
        self.data, self.ctx, self.aug = data, ctx, ctx.preset.augment
        self.images = torch.from_numpy(data.images)
        self.Y = torch.from_numpy(data.Y).float()
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = tokens and data.boxes is not None
        self.sound = data.mel is not None and data.counts is not None

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sample indices -> inputs (B, 3, S, S), soft targets (B, K), patch targets (B, N, K) or None."""
        v = self.view(idx)
        return v.x, v.y, v.tokens

    def view(self, idx: torch.Tensor) -> View:
        """Sample indices -> one augmented batch (``View``); the same random draws as ``__call__``."""
        frames, y = self.images[idx], self.Y[idx]
        boxes = None if self.data.boxes is None else [self.data.boxes[i] for i in idx.tolist()]
        mel = count = None
        if self.sound:
            assert self.data.mel is not None and self.data.counts is not None
            at = idx.numpy()
            mel, count = torch.from_numpy(self.data.mel[at]), torch.from_numpy(self.data.counts[at])
        if boxes is not None:
            before = torch.tensor([len(b) for b in boxes], dtype=torch.float32)
            frames, y, boxes, donors = paste_objects(frames, y, boxes, self.aug.paste, self.gen)
            if mel is not None:
                mel = mel.clone()
                for i, j in enumerate(donors):  # in paste order: a donor's window as it was when it gave
                    if j >= 0:
                        mel[i] = add_sound(mel[i], mel[j])
        frames, geom = augment_geometry(frames, self.aug, self.gen)
        size, dev = frames.shape[1], self.ctx.device
        if boxes is not None:
            boxes, y = move_boxes(boxes, y, geom, size)
            if count is not None:
                # objects pasted in, hidden or cropped away (annotations without a box count as they were)
                count = count + torch.tensor([len(b) for b in boxes], dtype=torch.float32) - before
        x = to_input(frames, self.ctx.spec, dev)
        tok = (
            patch_targets(boxes, y.shape[1], size, self.ctx.preset.patch_size).to(dev)
            if self.tokens
            else None
        )
        extra = [t.to(dev) for t in (tok, mel, count) if t is not None]
        mixed = mixup(x, y.to(dev), *extra, alpha=self.aug.mixup_alpha, gen=self.gen)
        x, y, rest = mixed[0], mixed[1], list(mixed[2:])
        tok = rest.pop(0) if tok is not None else None
        mel, count = (rest[0], rest[1]) if mel is not None else (None, None)
        return View(x, y, tok, mel, count)


@dataclass
class Ctx:
    """What every stage needs besides its own inputs."""

    spec: InputSpec
    preset: Preset
    env: DistEnv
    seed: int
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return self.env.device


def jsonable(x: float) -> float | None:
    """JSON has no nan: None where a number is undefined (e.g. mAP without positives)."""
    return None if x is None or not math.isfinite(x) else float(x)


def _param_groups(params: Sequence[tuple[str, nn.Parameter]], wd: float) -> list[dict]:
    # no weight decay on norms, biases, embeddings and LoRA's tiny vectors (the usual ViT recipe)
    decay = [p for n, p in params if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def fit(
    params: Sequence[tuple[str, nn.Parameter]],
    pool: Callable[[int], torch.Tensor] | int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    sched: Schedule,
    ctx: Ctx,
    desc: str,
    bar: tqdm | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW + warmup + cosine over ``sched.epochs``; ``pool`` is the sample count or epoch -> sample indices.

    ``bar`` shares one progress bar between several fits (one bar per stage); ``on_epoch_end(epoch)`` runs
    after every epoch (model selection). Returns the mean loss of every epoch (averaged over ranks).
    """
    env = ctx.env
    pools = [pool(e) if callable(pool) else torch.arange(pool) for e in range(sched.epochs)]
    bs = max(1, sched.batch_size // env.world_size)
    steps = [math.ceil(math.ceil(len(p) / env.world_size) / bs) for p in pools]
    total = max(1, sum(steps))
    warm = int(sched.warmup * total)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    opt = torch.optim.AdamW(_param_groups(params, sched.weight_decay), lr=sched.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    own = bar is None
    if bar is None:
        bar = stage_bar(desc, ctx)
    bar.total = (bar.total or 0) + total
    bar.refresh()
    for epoch, p in enumerate(pools):
        order = p[epoch_order(len(p), env, epoch, ctx.seed)]
        run, n = 0.0, 0
        for i in range(0, len(order), bs):
            loss = step_loss(order[i : i + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            run, n = run + float(loss.detach()), n + 1
            bar.update()
            bar.set_postfix_str(f"{desc} epoch {epoch + 1}/{sched.epochs} loss {run / n:.4f}")
        losses.append(mean_across(run / max(n, 1), env))
        log.debug("%s epoch %d/%d: loss %.4f", desc, epoch + 1, sched.epochs, losses[-1])
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if own:
        bar.close()
    return losses


def stage_bar(desc: str, ctx: Ctx) -> tqdm:
    """A progress bar for one stage, shown on rank 0 only."""
    return tqdm(total=0, desc=desc, unit="step", disable=not (ctx.progress and ctx.env.is_main))


def trunk_pass(
    vit: VisionTransformer, x: torch.Tensor, collect: Sequence[int], final: bool
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Images -> tokens after each block in ``collect`` and, if ``final``, the generalist's logits."""
    end = vit.cfg.depth if final else max(collect)
    tokens, done = {}, 0
    x = vit.forward_embed(x)
    for b in sorted(set(collect) | {end}):
        x = vit.forward_blocks(x, done, b)
        done = b
        if b in collect:
            tokens[b] = x
    return tokens, (vit.forward_head(x) if final else None)


@torch.no_grad()
def frozen_features(
    vit: VisionTransformer, images: np.ndarray, ctx: Ctx, collect: Sequence[int], final: bool = False
) -> tuple[dict[int, torch.Tensor], np.ndarray | None]:
    """One trunk pass over un-augmented frames: tokens after each block in ``collect`` (on the device)
    and, if ``final``, the generalist's probabilities."""
    vit.eval()
    feats: dict[int, list[torch.Tensor]] = {b: [] for b in collect}
    probs = []
    for i in range(0, len(images), EVAL_BATCH):
        tokens, logits = trunk_pass(
            vit, to_input(images[i : i + EVAL_BATCH], ctx.spec, ctx.device), collect, final
        )
        for b, t in tokens.items():
            feats[b].append(t)
        if logits is not None:
            probs.append(torch.sigmoid(logits).cpu())
    out = {b: torch.cat(v) for b, v in feats.items()}
    return out, (torch.cat(probs).numpy() if final else None)


def predict(vit: VisionTransformer, images: np.ndarray, ctx: Ctx) -> np.ndarray:
    """The generalist's probabilities (F, K)."""
    return frozen_features(vit, images, ctx, [], final=True)[1]


def freeze(vit: VisionTransformer) -> None:
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)


class KeepBest:
    """Model selection on the calibration split: keep the weights of the best-scoring epoch.

    Every rank holds identical weights and scores the same frames, so all ranks choose alike.
    """

    def __init__(self, module: nn.Module, score: float | None = None) -> None:
        self.module, self.epoch = module, 0
        self.score = -math.inf if score is None or not math.isfinite(score) else score
        self.state = None if score is None else self._copy()

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def update(self, score: float, epoch: int) -> None:
        if math.isfinite(score) and score > self.score:  # strict: the earliest of equal epochs wins
            self.score, self.epoch, self.state = score, epoch, self._copy()

    def restore(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state)
