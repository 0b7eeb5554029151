"""The training stages: generalist, exits (copycat), context adapters, calibration.

Each stage takes live modules and preloaded frames, trains, evaluates on the
report split and returns JSON-ready numbers; ``models/train/train.py`` orders them,
saves their outputs and makes them resumable. The frozen-backbone stages (exits,
adapters) run the trunk once over the data and train on the cached tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.core.calibrate import (
    calibrate_exit,
    centre,
    decision_thresholds,
    logit_offsets,
    recall_thresholds,
)
from polymorphd.models.core.cost import count_params, exit_flops, gflops
from polymorphd.models.core.knobs import CLASS_RECALL_VERSION, ClassRecall, manifest_policy
from polymorphd.models.core.metrics import label_quality, mean_average_precision
from polymorphd.models.nn.exits import build_exit
from polymorphd.models.nn.lora import AdapterTail, ContextAdapter, tail_start
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train.augment import mixup
from polymorphd.models.train.distributed import wrap
from polymorphd.models.train.loop import (
    EVAL_BATCH,
    Batches,
    Ctx,
    KeepBest,
    SplitData,
    fit,
    freeze,
    frozen_features,
    jsonable,
    predict,
    stage_bar,
    trunk_pass,
)
from polymorphd.models.train.presets import Preset

log = logging.getLogger(__name__)


class _DenseViT(nn.Module):
    """The generalist returning class-token logits and every patch token's logits (shared head)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vit
        x = v.forward_blocks(v.forward_embed(x), 0, v.cfg.depth)
        return v.forward_head(x), v.head(v.norm(x[:, 1:]))  # (B, K), (B, N, K)


# --- stage 1 -----------------------------------------------------------------------------------------------


def train_generalist(
    vit: VisionTransformer, train: SplitData, calib: SplitData, report: SplitData, ctx: Ctx
) -> dict:
    """The whole ViT on all classes: BCE-with-logits, augmentation; returns mAP on calib and report splits."""
    vit.to(ctx.device).train()
    dense = _DenseViT(vit)
    model = wrap(dense, ctx.env)
    w_tok = ctx.preset.token_loss_weight
    batches = Batches(train, ctx, seed=ctx.seed * 7919 + ctx.env.rank, tokens=w_tok > 0)

    def step(idx: torch.Tensor) -> torch.Tensor:
        x, y, tok = batches(idx)
        cls_logits, patch_logits = model(x)
        loss = F.binary_cross_entropy_with_logits(cls_logits, y)
        if tok is not None:
            loss = loss + w_tok * F.binary_cross_entropy_with_logits(patch_logits, tok)
        return loss

    best = KeepBest(vit)
    curve: list[float | None] = []

    def select(epoch: int) -> None:
        score = mean_average_precision(calib.Y, predict(vit, calib.images, ctx))[0]
        curve.append(jsonable(score))
        best.update(score, epoch)
        vit.train()

    losses = fit(
        list(vit.named_parameters()), len(batches), step, ctx.preset.generalist, ctx, "generalist",
        on_epoch_end=select,
    )  # fmt: skip
    best.restore()
    vit.eval()
    return {
        "epochs": ctx.preset.generalist.epochs,
        "best_epoch": best.epoch,
        "losses": [jsonable(x) for x in losses],
        "map_calibration_by_epoch": curve,
        "map": jsonable(mean_average_precision(report.Y, predict(vit, report.images, ctx))[0]),
        "map_calibration": jsonable(best.score),
    }


# --- stage 2 -----------------------------------------------------------------------------------------------


class ExitBank(nn.Module):
    """Every exit variant side by side, so one pass over cached tokens trains them all."""

    def __init__(self, exits: Sequence[nn.Module], positions: Sequence[int]) -> None:
        super().__init__()
        self.exits = nn.ModuleList(exits)
        self.positions = list(positions)

    def forward(self, tokens: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [e(tokens[b]) for e, b in zip(self.exits, self.positions, strict=True)]


def exit_variants(preset: Preset) -> list[tuple[str, bool, int]]:
    """(kind, copycat, after_block) for every exit position: SL-ViT/MLP, with/without copycat."""
    return [(k, c, b) for b in preset.exit_after for k in ("slvit", "mlp") for c in (True, False)]


# cached exit training views are capped at this many bytes of tokens; fewer views are made beyond it
EXIT_CACHE_BYTES = 4 << 30


@torch.no_grad()
def exit_training_set(
    vit: VisionTransformer, train: SplitData, ctx: Ctx, positions: Sequence[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Frozen-trunk tokens at ``positions``, targets and the generalist's probabilities for the exit stage.

    The clean training frames plus ``preset.exit_views`` augmented copies of each (the generalist's
    augmentation: copy-paste, crop, flip, colour, mixup), each with the teacher's probabilities on that very
    view: copycat gets a teacher answer on frames the labels never covered. Capped at ``EXIT_CACHE_BYTES``.
    """
    tokens, teacher = frozen_features(vit, train.images, ctx, positions, final=True)
    n, per_view = len(train.Y), sum(t[0].numel() * t.element_size() for t in tokens.values())
    views = min(ctx.preset.exit_views, max(0, EXIT_CACHE_BYTES // max(1, n * per_view) - 1))
    if views < ctx.preset.exit_views:
        log.warning(
            "exits: %d augmented views of %d frames would exceed %.1f GiB of cached tokens; using %d",
            ctx.preset.exit_views, n, EXIT_CACHE_BYTES / 2**30, views,
        )  # fmt: skip
    feats = {b: [t] for b, t in tokens.items()}
    ys, teachers = (
        [torch.from_numpy(train.Y).float().to(ctx.device)],
        [torch.from_numpy(teacher).to(ctx.device)],
    )
    batches = Batches(train, ctx, seed=ctx.seed * 7919 + 13 + ctx.env.rank)
    bar = stage_bar("exit views", ctx)
    bar.total = views * math.ceil(n / EVAL_BATCH)
    vit.eval()
    for _ in range(views):
        for i in range(0, n, EVAL_BATCH):
            x, y, _ = batches(torch.arange(i, min(n, i + EVAL_BATCH)))
            toks, logits = trunk_pass(vit, x, positions, final=True)
            for b in positions:
                feats[b].append(toks[b])
            ys.append(y)
            teachers.append(torch.sigmoid(logits))
            bar.update()
    bar.close()
    return {b: torch.cat(v) for b, v in feats.items()}, torch.cat(ys), torch.cat(teachers).float()


def copycat_targets(teacher: torch.Tensor, preset: Preset) -> torch.Tensor:
    """The generalist's probabilities at the copycat temperature T: sigmoid(logit(p) / T)."""
    return torch.sigmoid(torch.logit(teacher.double(), eps=1e-7) / preset.copycat_temperature).float()


def exit_loss(
    logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, preset: Preset
) -> torch.Tensor:
    """BCE on the labels, or with copycat ``targets`` (``copycat_targets``) label_weight * BCE(labels) +
    distill_weight * T^2 * BCE(logits / T, targets)."""
    label = F.binary_cross_entropy_with_logits(logits, y)
    if targets is None:
        return label
    temp = preset.copycat_temperature
    distill = F.binary_cross_entropy_with_logits(logits / temp, targets)
    return preset.copycat_label_weight * label + preset.copycat_distill_weight * temp**2 * distill


def labels_at_own_thresholds(
    calib_truth: np.ndarray, calib_probs: np.ndarray, truth: np.ndarray, probs: np.ndarray, min_positives: int
) -> dict[str, float | None]:
    """Label F1 and exact match of the labels ``probs > t`` against ``truth``, t the classifier's own decision
    thresholds fit on the calibration frames as calibration fits them (``decision_thresholds``)."""
    t = decision_thresholds(calib_truth, calib_probs, min_positives=min_positives)
    return {k: jsonable(v) for k, v in label_quality(probs > t, truth).items()}


def train_exits(
    vit: VisionTransformer, train: SplitData, calib: SplitData, report: SplitData, ctx: Ctx
) -> tuple[list[nn.Module], list[dict]]:
    """Train all exit variants with the backbone frozen; returns modules and their numbers (variant order).

    The frozen trunk runs once over the training frames and ``exit_views`` augmented views of them
    (``exit_training_set``), caching its tokens at every exit position and its final probabilities (the
    copycat target); one pass over the cache trains every variant for the same fixed epochs. Measured on the
    small preset (3 seeds): the views lift the SL-ViT exit after block 2 from 0.56 to 0.62 test mAP and
    leave the MLP exit at 0.58; with the clean frames alone both overfit (train mAP 0.9). Picking epochs on
    the 6-video calibration split added more noise than it removed.

    Each variant's label F1 and exact match (``label_quality``) score its labels on the report split at its
    own decision thresholds, fit on the calibration split as calibration fits the deployed exits'.
    """
    freeze(vit)
    p = ctx.preset
    positions = list(p.exit_after)
    tokens, Y, teacher = exit_training_set(vit, train, ctx, positions)
    torch.manual_seed(ctx.seed + 1)
    variants = exit_variants(p)
    cfgs = {k: {ec.after_block: ec for ec in p.exit_configs(k)} for k in ("slvit", "mlp")}
    modules = [build_exit(vit.cfg, cfgs[k][b]).to(ctx.device) for k, _, b in variants]
    bank = ExitBank(modules, [b for _, _, b in variants])
    model = wrap(bank, ctx.env)
    T = copycat_targets(teacher, p)

    def step(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(ctx.device)
        y, t = Y[idx], T[idx]
        outs = model({b: tokens[b][idx] for b in positions})
        loss = sum(exit_loss(z, y, t if c else None, p) for (_, c, _), z in zip(variants, outs, strict=True))
        return loss / len(variants)

    fit(list(bank.named_parameters()), len(Y), step, p.exits, ctx, "exits")
    bank.eval()
    scores, probs = {}, {}
    with torch.no_grad():
        for split in (calib, report):
            feats, _ = frozen_features(vit, split.images, ctx, positions)
            for i, (m, b) in enumerate(zip(modules, bank.positions, strict=True)):
                probs[split.name, i] = torch.sigmoid(m(feats[b])).cpu().numpy().astype(np.float64)
                scores[split.name, i] = jsonable(mean_average_precision(split.Y, probs[split.name, i])[0])
    results = []
    for i, ((kind, copycat, b), m) in enumerate(zip(variants, modules, strict=True)):
        labels = labels_at_own_thresholds(
            calib.Y, probs[calib.name, i], report.Y, probs[report.name, i], p.threshold_min_positives
        )
        results.append(
            {
                "after_block": b, "kind": kind, "copycat": copycat, "map": scores[report.name, i],
                "label_f1": labels["label_f1"], "exact_match": labels["exact_match"],
                "map_calibration": scores[calib.name, i],
                "gflops": gflops(exit_flops(vit.cfg, cfgs[kind][b])), "params": count_params(m),
                "train_samples": len(Y),
            }
        )  # fmt: skip
    return modules, results


# --- stage 4 -----------------------------------------------------------------------------------------------


def _context_map(Y: np.ndarray, P: np.ndarray, classes: Sequence[int]) -> float | None:
    return jsonable(mean_average_precision(Y[:, classes], P[:, classes])[0])


def train_adapters(
    vit: VisionTransformer,
    contexts: list[list[int]],
    train: SplitData,
    calib: SplitData,
    report: SplitData,
    ctx: Ctx,
) -> tuple[list[ContextAdapter], list[dict]]:
    """One LoRA adapter + head per context on the frozen backbone; mAP on the context's classes vs the generalist.

    Each adapter keeps its best epoch by calibration-split mAP on its classes, epoch 0 (the identity
    adapter with the generalist's head) included; without calibration positives, its last epoch.
    """
    freeze(vit)
    p = ctx.preset
    lora_cfg = p.lora_config()
    start = tail_start(vit.cfg, lora_cfg)
    before = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    tokens = frozen_features(vit, train.images, ctx, [start])[0][start]
    Y = torch.from_numpy(train.Y).float().to(ctx.device)
    rep_tokens = frozen_features(vit, report.images, ctx, [start])[0][start]
    cal_tokens = frozen_features(vit, calib.images, ctx, [start])[0][start]
    generalist = predict(vit, report.images, ctx)
    adapters, results = [], []
    bar = stage_bar("adapters", ctx)
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + 29 + ctx.env.rank)
    for ci, classes in enumerate(contexts):
        torch.manual_seed(ctx.seed * 100 + ci)
        adapter = ContextAdapter(vit.cfg, lora_cfg, head_init=vit.head).to(ctx.device)
        tail = AdapterTail(vit, adapter)
        model = wrap(tail, ctx.env)
        present = train.Y[:, classes].any(axis=1)
        pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
        n_neg = min(len(neg), round(p.negative_ratio * len(pos)))
        cls = torch.tensor(classes, device=ctx.device)

        def pool(epoch: int, pos=pos, neg=neg, n_neg=n_neg, ci=ci) -> torch.Tensor:
            # fresh negatives every epoch, the same on every rank (seeded by epoch, not rank)
            rng = np.random.default_rng([ctx.seed, ci, epoch])
            return torch.from_numpy(np.concatenate([pos, rng.choice(neg, n_neg, replace=False)]))

        def step(idx: torch.Tensor, model=model, cls=cls) -> torch.Tensor:
            idx = idx.to(ctx.device)
            # cached tokens cannot be re-augmented: mix them instead (manifold mixup, Verma et al. 2019)
            x, y = mixup(tokens[idx], Y[idx][:, cls], alpha=p.augment.mixup_alpha, gen=gen)
            return F.binary_cross_entropy_with_logits(model(x)[:, cls], y)

        @torch.no_grad()
        def score(tail=tail, classes=classes) -> float:
            return mean_average_precision(
                calib.Y[:, classes], torch.sigmoid(tail(cal_tokens)).cpu().numpy()[:, classes]
            )[0]

        first = score()
        keep = KeepBest(adapter, first) if math.isfinite(first) else None

        def select(epoch: int, keep=keep, score=score) -> None:
            if keep is not None:
                keep.update(score(), epoch)

        trained = len(pos) > 0 and p.adapters.epochs > 0
        if trained:
            desc = f"context {ci + 1}/{len(contexts)}"
            fit(list(adapter.named_parameters()), pool, step, p.adapters, ctx, desc, bar, on_epoch_end=select)
        if keep is not None:
            keep.restore()
        adapter.eval()
        with torch.no_grad():
            probs = torch.sigmoid(tail(rep_tokens)).cpu().numpy()
        adapters.append(adapter)
        results.append(
            {
                "context": ci, "classes": list(classes), "train_frames": len(pos), "negatives": int(n_neg),
                "trained": trained, "best_epoch": None if keep is None else keep.epoch,
                "map_generalist": _context_map(report.Y, generalist, classes),
                "map_adapter": _context_map(report.Y, probs, classes),
            }
        )  # fmt: skip
    bar.close()
    for k, v in vit.state_dict().items():
        if not torch.equal(v, before[k]):
            raise RuntimeError(
                f"backbone tensor {k} changed during adapter training; the base must stay frozen"
            )
    return adapters, results


# --- stage 5 -----------------------------------------------------------------------------------------------

# Below this many calibration videos the fit is noisy enough to warn: thresholds fit on 12 (9) videos scored
# label F1 0.012 (0.038) below those fit on 48 (36) on the default (second) dataset (bench/split_size.py).
FEW_CALIBRATION_VIDEOS = 30


def calibrate(vit: VisionTransformer, exits: Sequence[nn.Module], calib: SplitData, ctx: Ctx) -> dict:
    """Decision thresholds of the final classifier; per exit its own thresholds and (lo, hi).

    Thresholds are per class where the calibration split has ``threshold_min_positives`` positives of the
    class, one global F1-best threshold elsewhere (``calibrate.decision_thresholds``). Each exit's logits are
    centred per class on that exit's own threshold t_k (``logit_offsets``
    = logit(t_k), subtracted from the head's bias when the run loads): a single (lo, hi) pair then means
    "confidently away from the class's own threshold" for every class alike. Uncentred, one global pair
    had to serve classes whose best thresholds range from 0.05 to 0.9, and on the small run the exit after
    block 2 left 15 % of calibration frames, against 100 % centred at equal F1 (models/core/calibrate.py).

    (lo, hi) is chosen on some calibration videos and checked on the others (``calibrate_exit``), videos
    told apart by the split's ``video_ids``. Per exit: lo, hi, exit_rate, and on the held-out
    videos the mAP and F1 cost of answering there (map_cost, f1_cost).
    """
    freeze(vit)
    positions = [m.cfg.after_block for m in exits]
    tokens, final = frozen_features(vit, calib.images, ctx, positions, final=True)
    n = ctx.preset.threshold_min_positives
    thr = decision_thresholds(calib.Y, final, min_positives=n)
    if calib.videos < 2:
        log.warning(
            "calibration split %s has %d video(s): nothing to hold out, so no exit will answer",
            calib.name,
            calib.videos,
        )
    elif calib.videos < FEW_CALIBRATION_VIDEOS:
        log.warning(
            "calibration split %s has %d videos: thresholds and exit bounds fit on so few are noisy (36 "
            "instead of 9 raised test label F1 by 0.038 on a second dataset; docs/ARCHITECTURE.md, \"How many "
            "videos a number needs\"); aim for %d or more",
            calib.name, calib.videos, FEW_CALIBRATION_VIDEOS,
        )  # fmt: skip
    out_exits = []
    with torch.no_grad():
        for m in exits:
            m.eval()
            pe = torch.sigmoid(m(tokens[m.cfg.after_block])).cpu().numpy().astype(np.float64)
            offsets = logit_offsets(decision_thresholds(calib.Y, pe, min_positives=n))
            lo, hi, stats = calibrate_exit(
                centre(pe, offsets),
                final,
                calib.Y,
                thr,
                tolerance=ctx.preset.exit_tolerance,
                groups=calib.video_ids,
                centred=True,
                confidence=ctx.preset.exit_confidence,
            )
            log.info(
                "exit after block %d: lo %.4g hi %.4g, %.1f%% of calibration frames; on held-out videos "
                "mAP cost %.4f, F1 cost %.4f (tolerance %g)",
                m.cfg.after_block, lo, hi, 100 * stats["exit_rate"], stats["map_cost"], stats["f1_cost"],
                ctx.preset.exit_tolerance,
            )  # fmt: skip
            entry = {"after_block": m.cfg.after_block, "lo": lo, "hi": hi}
            entry |= {k: jsonable(v) for k, v in stats.items()}
            out_exits.append(entry | {"logit_offsets": [float(x) for x in offsets]})
            # the daemon's policy reads the last exit's (centred) scores
            last = (m.cfg.after_block, centre(pe, offsets))
    class_recall = fit_class_recall(calib.Y, *last, ctx.preset) if exits else None
    return {
        "class_thresholds": [float(t) for t in thr],
        "exits": out_exits,
        # the runtime policy's defaults and the per-class recall cuts, into the manifest
        "policy": manifest_policy(class_recall=class_recall),
        "tolerance": ctx.preset.exit_tolerance,
        "confidence": ctx.preset.exit_confidence,
        "split": calib.name,
    }


def fit_class_recall(Y: np.ndarray, after_block: int, scores: np.ndarray, preset: Preset) -> ClassRecall:
    """The policy's per-class recall cuts (manifest ``policy.class_recall``) on the last exit's centred
    calibration scores: each class keeps ``preset.selection_recall`` of its positives, the pooled cut where
    it has fewer than ``preset.selection_min_positives`` (``calibrate.recall_thresholds``)."""
    recall, n = preset.selection_recall, preset.selection_min_positives
    cuts, pooled = recall_thresholds(Y, scores, recall=recall, min_positives=n)
    log.info(
        "selection: recall %.2f cuts on the exit after block %d for %d of %d classes, pooled cut %.4g for "
        "the rest", recall, after_block, int((Y.sum(axis=0) >= n).sum()), len(cuts), pooled,
    )  # fmt: skip
    return ClassRecall(
        version=CLASS_RECALL_VERSION, target=recall, exit_after_block=after_block, min_positives=n,
        pooled=pooled, thresholds=[float(t) for t in cuts],
    )  # fmt: skip
