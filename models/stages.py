"""The training stages: generalist, exits (copycat), context adapters, calibration.

Each stage takes live modules and preloaded frames, trains, evaluates on the
report split and returns JSON-ready numbers; ``models/train.py`` orders them,
saves their outputs and makes them resumable. The frozen-backbone stages (exits,
adapters) run the trunk once over the data and train on the cached tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from polymorphd.models.augment import augment_batch, mixup, to_input
from polymorphd.models.calibrate import calibrate_exit, class_thresholds
from polymorphd.models.cost import count_params, exit_flops, gflops
from polymorphd.models.distributed import DistEnv, epoch_order, mean_across, wrap
from polymorphd.models.exits import build_exit
from polymorphd.models.lora import ContextAdapter, adapter_logits, tail_start
from polymorphd.models.metrics import mean_average_precision
from polymorphd.models.preprocess import InputSpec
from polymorphd.models.presets import Preset, Schedule
from polymorphd.models.vit import VisionTransformer

log = logging.getLogger(__name__)

# runtime context-policy defaults written to calibration.json (daemon/policy.PolicyConfig reads the same keys)
POLICY_DEFAULTS = {
    "max_adapters": 2,
    "recall_threshold": 0.2,
    "keep_frames": 2,
    "refresh_every": 30,
    "surprise_jaccard": 0.3,
}
EVAL_BATCH = 256


@dataclass
class SplitData:
    """One split's annotated frames, preloaded at the model input size."""

    name: str
    images: np.ndarray  # (F, S, S, 3) uint8 BGR
    Y: np.ndarray  # (F, K) uint8 multi-hot
    videos: int


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
) -> list[float]:
    """AdamW + warmup + cosine over ``sched.epochs``; ``pool`` is the sample count or epoch -> sample indices.

    ``bar`` shares one progress bar between several fits (one bar per stage). Returns the mean loss of
    every epoch (averaged over ranks).
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


def _freeze(vit: VisionTransformer) -> None:
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)


# --- stage 1 -----------------------------------------------------------------------------------------------


def train_generalist(
    vit: VisionTransformer, train: SplitData, calib: SplitData, report: SplitData, ctx: Ctx
) -> dict:
    """The whole ViT on all classes: BCE-with-logits, augmentation; returns mAP on calib and report splits."""
    vit.to(ctx.device).train()
    model = wrap(vit, ctx.env)
    images = torch.from_numpy(train.images)
    Y = torch.from_numpy(train.Y).float().to(ctx.device)
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + ctx.env.rank)

    aug = ctx.preset.augment

    def step(idx: torch.Tensor) -> torch.Tensor:
        x = to_input(augment_batch(images[idx], aug, gen), ctx.spec, ctx.device)
        x, y = mixup(x, Y[idx.to(ctx.device)], aug.mixup_alpha, gen)
        return F.binary_cross_entropy_with_logits(model(x), y)

    losses = fit(list(vit.named_parameters()), len(images), step, ctx.preset.generalist, ctx, "generalist")
    vit.eval()
    return {
        "epochs": ctx.preset.generalist.epochs,
        "final_loss": jsonable(losses[-1]) if losses else None,
        "map": jsonable(mean_average_precision(report.Y, predict(vit, report.images, ctx))[0]),
        "map_calibration": jsonable(mean_average_precision(calib.Y, predict(vit, calib.images, ctx))[0]),
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


def train_exits(
    vit: VisionTransformer, train: SplitData, report: SplitData, ctx: Ctx
) -> tuple[list[nn.Module], list[dict]]:
    """Train all exit variants with the backbone frozen; returns modules and their numbers (variant order).

    Every batch is augmented (as for the generalist) and run through the frozen trunk ONCE; its tokens at
    every exit position and its final probabilities (the copycat target) feed all variants.
    """
    _freeze(vit)
    p = ctx.preset
    positions = list(p.exit_after)
    torch.manual_seed(ctx.seed + 1)
    variants = exit_variants(p)
    cfgs = {k: {ec.after_block: ec for ec in p.exit_configs(k)} for k in ("slvit", "mlp")}
    modules = [build_exit(vit.cfg, cfgs[k][b]).to(ctx.device) for k, _, b in variants]
    bank = ExitBank(modules, [b for _, _, b in variants])
    model = wrap(bank, ctx.env)
    images = torch.from_numpy(train.images)
    Y = torch.from_numpy(train.Y).float().to(ctx.device)
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + 17 + ctx.env.rank)
    wl, wd, aug = p.copycat_label_weight, p.copycat_distill_weight, p.augment

    def step(idx: torch.Tensor) -> torch.Tensor:
        x = to_input(augment_batch(images[idx], aug, gen), ctx.spec, ctx.device)
        x, y = mixup(x, Y[idx.to(ctx.device)], aug.mixup_alpha, gen)
        with torch.no_grad():
            tokens, logits = trunk_pass(vit, x, positions, final=True)
            t = torch.sigmoid(logits)
        outs = model(tokens)
        loss = 0.0
        for (_, copycat, _), logits in zip(variants, outs, strict=True):
            label = F.binary_cross_entropy_with_logits(logits, y)
            loss = loss + (
                wl * label + wd * F.binary_cross_entropy_with_logits(logits, t) if copycat else label
            )
        return loss / len(variants)

    fit(list(bank.named_parameters()), len(images), step, p.exits, ctx, "exits")
    bank.eval()
    rep_tokens, _ = frozen_features(vit, report.images, ctx, positions)
    results = []
    with torch.no_grad():
        for (kind, copycat, b), m in zip(variants, modules, strict=True):
            probs = torch.sigmoid(m(rep_tokens[b])).cpu().numpy()
            results.append(
                {
                    "after_block": b, "kind": kind, "copycat": copycat,
                    "map": jsonable(mean_average_precision(report.Y, probs)[0]),
                    "gflops": gflops(exit_flops(vit.cfg, cfgs[kind][b])), "params": count_params(m),
                }
            )  # fmt: skip
    return modules, results


# --- stage 4 -----------------------------------------------------------------------------------------------


class _Tail(nn.Module):
    """One adapter over cached trunk tokens; the frozen backbone is held, not registered (DDP syncs the adapter)."""

    def __init__(self, vit: VisionTransformer, adapter: ContextAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self._vit = (vit,)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return adapter_logits(self._vit[0], tokens, self.adapter)


def _context_map(Y: np.ndarray, P: np.ndarray, classes: Sequence[int]) -> float | None:
    return jsonable(mean_average_precision(Y[:, classes], P[:, classes])[0])


def train_adapters(
    vit: VisionTransformer, contexts: list[list[int]], train: SplitData, report: SplitData, ctx: Ctx
) -> tuple[list[ContextAdapter], list[dict]]:
    """One LoRA adapter + head per context on the frozen backbone; mAP on the context's classes vs the generalist."""
    _freeze(vit)
    p = ctx.preset
    lora_cfg = p.lora_config()
    start = tail_start(vit.cfg, lora_cfg)
    before = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    tokens = frozen_features(vit, train.images, ctx, [start])[0][start]
    Y = torch.from_numpy(train.Y).float().to(ctx.device)
    rep_tokens = frozen_features(vit, report.images, ctx, [start])[0][start]
    generalist = predict(vit, report.images, ctx)
    adapters, results = [], []
    bar = stage_bar("adapters", ctx)
    for ci, classes in enumerate(contexts):
        torch.manual_seed(ctx.seed * 100 + ci)
        adapter = ContextAdapter(vit.cfg, lora_cfg, head_init=vit.head).to(ctx.device)
        tail = _Tail(vit, adapter)
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
            logits = model(tokens[idx])
            return F.binary_cross_entropy_with_logits(logits[:, cls], Y[idx][:, cls])

        trained = len(pos) > 0 and p.adapters.epochs > 0
        if trained:
            fit(
                list(adapter.named_parameters()),
                pool,
                step,
                p.adapters,
                ctx,
                f"context {ci + 1}/{len(contexts)}",
                bar,
            )
        adapter.eval()
        with torch.no_grad():
            probs = torch.sigmoid(tail(rep_tokens)).cpu().numpy()
        adapters.append(adapter)
        results.append(
            {
                "context": ci, "classes": list(classes), "train_frames": len(pos), "negatives": int(n_neg),
                "trained": trained, "map_generalist": _context_map(report.Y, generalist, classes),
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


def calibrate(vit: VisionTransformer, exits: Sequence[nn.Module], calib: SplitData, ctx: Ctx) -> dict:
    """Per-class thresholds of the final classifier, per-exit (lo, hi), policy defaults."""
    _freeze(vit)
    positions = [m.cfg.after_block for m in exits]
    tokens, final = frozen_features(vit, calib.images, ctx, positions, final=True)
    thr = class_thresholds(calib.Y, final)
    out_exits = []
    with torch.no_grad():
        for m in exits:
            m.eval()
            pe = torch.sigmoid(m(tokens[m.cfg.after_block])).cpu().numpy().astype(np.float64)
            lo, hi, stats = calibrate_exit(pe, final, calib.Y, thr, tolerance=ctx.preset.exit_tolerance)
            entry = {"after_block": m.cfg.after_block, "lo": lo, "hi": hi}
            entry |= {k: jsonable(v) for k, v in stats.items()}
            out_exits.append(entry)
    return {
        "class_thresholds": [float(t) for t in thr],
        "exits": out_exits,
        "policy": dict(POLICY_DEFAULTS),
        "tolerance": ctx.preset.exit_tolerance,
        "split": calib.name,
    }
