"""Audiovisual and count exits on a frozen backbone: training (copycat + count L1) and their measurement.

The exits stage's recipe (``stages.train_exits``): the frozen trunk runs once over the clean training frames
and ``views`` augmented copies, caching its tokens at every exit position and the generalist's probabilities
(the copycat teacher); every variant then trains on the cache. Here each exit also has a count head (L1 on
objects per frame), the audiovisual variant reads the frame's log-mel window beside the tokens, and the final
block gets a count head (``CountHead``) on the cached final class token. The augmented views are the exits
stage's (``loop.Batches``: copy-paste, crop, flip, colour, mixup) with the sound and the count following the
picture (``Batches.view``): a pasted object brings its frame's sound, the count follows the boxes, mixup blends
log-mel and count like the labels. Until issue 14c they were crop, flip and colour only, which cost the exits
mAP against the deployed visual ones (bench/avexits_recipe.py; docs/ARCHITECTURE.md).

``measure`` scores every exit on the report split the way the daemon would use it: mAP, label F1 at the
exit's own thresholds, the share of frames it would answer at the preset's tolerance (labels: the calibrated
(lo, hi) of ``calibrate.calibrate_exit`` on centred scores; counts: ``countrule.calibrate_count``), the count
MAE, and the cascade (the first exit that decides, else the final) that says whether frames leave earlier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polymorphd.models.core.calibrate import calibrate_exit, centre, decision_thresholds, logit_offsets
from polymorphd.models.core.countrule import calibrate_count, count_decides, count_mae
from polymorphd.models.core.exitrule import exit_decides
from polymorphd.models.core.melspec import LOG_FLOOR, MelConfig
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.nn.audio import AudioVisualExit, CountHead
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train.augment import to_input
from polymorphd.models.train.loop import (
    EVAL_BATCH,
    Batches,
    Ctx,
    SplitData,
    fit,
    freeze,
    jsonable,
    trunk_pass,
)
from polymorphd.models.train.stages import copycat_targets, exit_loss, labels_at_own_thresholds

log = logging.getLogger(__name__)

COUNT_WEIGHT = 0.5  # L1 count loss beside the copycat label loss (both about 0.1-1 at the start)
# Share of the count loss's gradient that reaches the exits' layers. With none (a stop-gradient) the last
# exit counted 47 % worse than the final head on the second dataset's 36 unseen test videos and its count
# rule held every frame back; with a tenth it counts 36-45 % better there and 17 % better on the default
# dataset, at about 0.005 exit mAP (docs/ARCHITECTURE.md, "A share of the count gradient").
COUNT_GRAD = 0.1
COUNT_TOLERANCE = 0.05  # objects: what a count exit may add to the final's MAE on the frames it answers
AUDIO_ONLY = "audioonly"  # the audio-only probe's name prefix (a diagnostic)
SILENCED = "|silenced"  # predict's suffix for an audiovisual exit fed silence (a diagnostic)
VIEWS = (
    1  # augmented views per frame for train --audio: what bench/audio_exits.py measured (the cache is big)
)
AUGMENTS = ("exits", "plain")  # features(augment=...): the exits stage's augmentation, or crop/flip/colour


@torch.no_grad()
def features(
    vit: VisionTransformer,
    data: SplitData,
    ctx: Ctx,
    positions: list[int],
    views: int = 0,
    seed: int = 0,
    augment: str = "exits",
) -> dict[str, Any]:
    """Trunk tokens at ``positions``, the final class token (normed), the teacher's probabilities and each
    sample's targets (labels, count, log-mel where the split has them), over the clean frames then ``views``
    augmented copies. ``augment``: "exits", the exits stage's (``loop.Batches``: copy-paste and mixup too,
    the sound and count following the picture); "plain", crop, flip and colour only (labels, count and
    sound those of the clean frame; the recipe before issue 14c, kept as an ablation)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    freeze(vit)
    depth = vit.cfg.depth
    out: dict[str, list] = {"tokens": [], "final": [], "teacher": [], "Y": [], "counts": [], "mel": []}
    if augment == "plain":
        aug = replace(ctx.preset.augment, paste=0.0, mixup_alpha=0.0)
        batches = Batches(
            replace(data, boxes=None, mel=None), replace(ctx, preset=replace(ctx.preset, augment=aug)), seed
        )
    else:
        batches = Batches(data, ctx, seed)
    n = len(data.Y)
    sound = data.mel is not None and data.counts is not None
    for view in range(views + 1):
        for i in range(0, n, EVAL_BATCH):
            idx = torch.arange(i, min(n, i + EVAL_BATCH))
            clean = slice(i, i + EVAL_BATCH)
            if view == 0 or augment == "plain":
                x = to_input(data.images[clean], ctx.spec, ctx.device) if view == 0 else batches(idx)[0]
                y = torch.from_numpy(data.Y[clean]).float()
                c = torch.from_numpy(data.counts[clean]) if sound else None
                m = torch.from_numpy(data.mel[clean]) if sound else None
            else:
                v = batches.view(idx)
                x, y, c, m = v.x, v.y, v.count, v.mel
            toks, logits = trunk_pass(vit, x, [*positions, depth], final=True)
            out["tokens"].append({b: toks[b] for b in positions})
            out["final"].append(vit.norm(toks[depth])[:, 0].clone())  # not a view: frees the full tensor
            out["teacher"].append(torch.sigmoid(logits))
            out["Y"].append(y)
            if sound:
                out["counts"].append(c)
                out["mel"].append(m)
    return {
        "tokens": {b: torch.cat([t[b] for t in out["tokens"]]) for b in positions},
        "final": torch.cat(out["final"]),
        "teacher": torch.cat(out["teacher"]).float(),
        "Y": torch.cat(out["Y"]).float(),
        "counts": torch.cat(out["counts"]).float() if sound else None,
        "mel": torch.cat(out["mel"]) if sound else None,
    }


def _seen(name: str, tokens: torch.Tensor) -> torch.Tensor:
    """What an exit sees of the trunk: nothing for the audio-only probe."""
    return torch.zeros_like(tokens) if name.startswith(AUDIO_ONLY) else tokens


def train(
    vit: VisionTransformer,
    data: SplitData,
    ctx: Ctx,
    mel: MelConfig,
    views: int,
    audio_probe: bool = False,
    copycat: bool = True,
    visual_dropout: float = 0.0,
    augment: str = "exits",
    count_weight: float = COUNT_WEIGHT,
    count_grad: float = COUNT_GRAD,
    cache: dict[str, Any] | None = None,
) -> tuple[dict[str, AudioVisualExit], CountHead]:
    """Visual and audiovisual exits (each with a count head) at every preset exit position, and the final
    count head, trained together on one cache: names ``visual@B`` / ``audiovisual@B``; with ``audio_probe``
    also ``audioonly@B`` (first position) that sees the audio and no trunk tokens. ``copycat=False`` trains on
    the labels alone (the teacher cannot hear: an ablation of what distillation does to the audio).
    ``visual_dropout`` zeroes an audiovisual exit's trunk tokens for that share of its training samples, so
    its layer must learn to answer from the audio (modality dropout; an experiment). ``augment`` picks the
    augmented views (``features``); ``count_weight`` is the exits' count L1 weight (0: labels only; the
    final count head always trains); ``count_grad`` the share of its gradient that reaches the exits' layers
    (0: the count heads read them through a stop-gradient; default ``COUNT_GRAD``). ``cache``: ``features``'
    output for these settings, reused across calls that differ only in the loss (bench/avexits_recipe.py)."""
    if data.mel is None or data.counts is None:
        raise ValueError(
            "audiovisual exits need the split's log-mel windows and counts (load_data(audio=...))"
        )
    p = ctx.preset
    positions = list(p.exit_after)
    if cache is None:
        cache = features(vit, data, ctx, positions, views, seed=ctx.seed * 7919 + 13, augment=augment)
    Y, C, M = cache["Y"], cache["counts"], cache["mel"]
    T = copycat_targets(cache["teacher"], p)
    torch.manual_seed(ctx.seed + 1)
    cfgs = {ec.after_block: ec for ec in p.exit_configs("slvit")}
    exits = {
        f"{kind}@{b}": AudioVisualExit(
            vit.cfg, cfgs[b], mel if kind == "audiovisual" else None, count_grad=count_grad
        )
        for b in positions
        for kind in ("visual", "audiovisual")
    }
    if audio_probe:  # the exit's layer over audio tokens alone (visual tokens zeroed): what the audio carries
        exits[f"{AUDIO_ONLY}@{positions[0]}"] = AudioVisualExit(vit.cfg, cfgs[positions[0]], mel)
    final = CountHead(vit.cfg.embed_dim)
    modules = torch.nn.ModuleDict({k.replace("@", "_"): m for k, m in exits.items()} | {"final": final})

    drop = torch.Generator().manual_seed(ctx.seed * 7919 + 41)

    def step(idx: torch.Tensor) -> torch.Tensor:
        y, t, c = Y[idx], T[idx], C[idx]
        loss = F.l1_loss(final(cache["final"][idx]), c)
        for name, m in exits.items():
            seen = _seen(name, cache["tokens"][m.cfg.after_block][idx])
            if visual_dropout and name.startswith("audiovisual"):
                keep = (torch.rand(len(idx), 1, 1, generator=drop) >= visual_dropout).to(seen.dtype)
                seen = seen * keep
            logits, count = m.forward_all(seen, M[idx] if m.audio else None)
            loss = loss + exit_loss(logits, y, t if copycat else None, p) + count_weight * F.l1_loss(count, c)
        return loss / (len(exits) + 1)

    fit(list(modules.named_parameters()), len(Y), step, p.exits, ctx, "av exits")
    modules.eval()
    return exits, final


@torch.no_grad()
def predict(
    vit: VisionTransformer, exits: dict[str, AudioVisualExit], final: CountHead, data: SplitData, ctx: Ctx
) -> dict[str, Any]:
    """Per exit name (and "final"): probabilities (F, K) and counts (F,) on a split's clean frames."""
    positions = sorted({m.cfg.after_block for m in exits.values()})
    cache = features(vit, data, ctx, positions)
    mel = torch.from_numpy(data.mel) if data.mel is not None else None
    out: dict[str, Any] = {
        "final": (cache["teacher"].numpy().astype(np.float64), final(cache["final"]).numpy())
    }
    for name, m in exits.items():
        z, c = m.forward_all(_seen(name, cache["tokens"][m.cfg.after_block]), mel if m.audio else None)
        out[name] = (torch.sigmoid(z).numpy().astype(np.float64), c.numpy())
        # the same exit hearing silence: how much it leans on audio
        if m.audio is not None and mel is not None and not name.startswith(AUDIO_ONLY):
            quiet = torch.full_like(mel, math.log(LOG_FLOOR))
            z, c = m.forward_all(_seen(name, cache["tokens"][m.cfg.after_block]), quiet)
            out[f"{name}{SILENCED}"] = (torch.sigmoid(z).numpy().astype(np.float64), c.numpy())
    return out


def measure(
    calib: SplitData, report: SplitData, pred_calib: dict[str, Any], pred_report: dict[str, Any], ctx: Ctx
) -> dict[str, Any]:
    """Per exit on the report split: mAP, label F1, label/count/both exit rates at the preset's tolerance,
    count MAE; the final's mAP, F1 and count MAE; and per variant the cascade's exit shares and mean depth."""
    p = ctx.preset
    n_min = p.threshold_min_positives
    thr = decision_thresholds(calib.Y, pred_calib["final"][0], min_positives=n_min)
    P_final_r, c_final_r = pred_report["final"]
    labels = labels_at_own_thresholds(calib.Y, pred_calib["final"][0], report.Y, P_final_r, n_min)
    result: dict[str, Any] = {
        "final": {
            "map": jsonable(mean_average_precision(report.Y, P_final_r)[0]),
            "label_f1": labels["label_f1"],
            "count_mae": jsonable(count_mae(c_final_r, report.counts)),
        },
        "exits": {},
        "cascade": {},
    }
    decided: dict[str, np.ndarray] = {}
    for name in (k for k in pred_report if k != "final"):
        Pc, _ = pred_calib[name]
        Pr, cr = pred_report[name]
        cal = calibrate(calib, pred_calib, name, ctx, thr)
        offsets, lo, hi, margin = cal["logit_offsets"], cal["lo"], cal["hi"], cal["count_margin"]
        lab = exit_decides(centre(Pr, offsets), lo, hi)
        cnt = count_decides(cr, margin)
        decided[name] = lab & cnt
        own = labels_at_own_thresholds(calib.Y, Pc, report.Y, Pr, n_min)
        result["exits"][name] = {
            "map": jsonable(mean_average_precision(report.Y, Pr)[0]),
            "label_f1": own["label_f1"],
            "lo": lo, "hi": hi, "count_margin": margin,
            "label_exit_rate": float(np.mean(lab)), "count_exit_rate": float(np.mean(cnt)),
            "exit_rate": float(np.mean(decided[name])),
            "count_mae": jsonable(count_mae(cr, report.counts)),
        }  # fmt: skip
    for kind in ("visual", "audiovisual"):
        names = [k for k in decided if k.startswith(f"{kind}@") and SILENCED not in k]
        names.sort(key=lambda k: int(k.split("@")[1]))
        left = np.ones(len(report.Y), dtype=bool)
        shares, depth = {}, np.full(len(report.Y), float(p.depth))
        for name in names:
            here = left & decided[name]
            shares[name] = float(here.mean())
            depth[here] = int(name.split("@")[1])
            left &= ~here
        shares["final"] = float(left.mean())
        result["cascade"][kind] = {"shares": shares, "mean_depth": float(depth.mean())}
    return result


def calibrate(
    calib: SplitData, pred_calib: dict[str, Any], name: str, ctx: Ctx, thr: np.ndarray | None = None
) -> dict[str, Any]:
    """Exit ``name``'s deployed calibration on the calibration split: per-class ``logit_offsets`` (its scores
    centred on its own thresholds), the label rule's (lo, hi) at the preset's tolerance and the count rule's
    margin (``countrule.calibrate_count``). ``thr``: the final's class thresholds (computed when None)."""
    p = ctx.preset
    n_min = p.threshold_min_positives
    if thr is None:
        thr = decision_thresholds(calib.Y, pred_calib["final"][0], min_positives=n_min)
    Pc, cc = pred_calib[name]
    offsets = logit_offsets(decision_thresholds(calib.Y, Pc, min_positives=n_min))
    lo, hi, _ = calibrate_exit(
        centre(Pc, offsets), pred_calib["final"][0], calib.Y, thr,
        tolerance=p.exit_tolerance, groups=calib.video_ids, centred=True,
    )  # fmt: skip
    margin, _ = calibrate_count(
        cc, pred_calib["final"][1], calib.counts, tolerance=COUNT_TOLERANCE, groups=calib.video_ids
    )
    return {
        "lo": float(lo),
        "hi": float(hi),
        "logit_offsets": [float(x) for x in offsets],
        "count_margin": float(margin),
    }


def train_deployed(
    vit: VisionTransformer,
    train_split: SplitData,
    calib: SplitData,
    report: SplitData,
    ctx: Ctx,
    mel: MelConfig,
) -> tuple[list[AudioVisualExit], list[dict[str, Any]], CountHead, dict[str, Any]]:
    """``polymorphd train --audio``'s stage: train (``train``), calibrate the audiovisual exits for the bundle
    (block order) and measure every exit beside its visual twin on the report split (``measure``)."""
    exits, final = train(vit, train_split, ctx, mel, views=VIEWS)
    pc = predict(vit, exits, final, calib, ctx)
    pr = predict(vit, exits, final, report, ctx)
    names = sorted((k for k in exits if k.startswith("audiovisual@")), key=lambda k: int(k.split("@")[1]))
    cals = [calibrate(calib, pc, n, ctx) for n in names]
    measured = measure(calib, report, pc, pr, ctx) | {"count_grad": exits[names[0]].count_grad}
    return [exits[n] for n in names], cals, final, measured


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every number in ``measure``'s results (same structure, leaves [mean, std])."""

    def walk(items: list[Any]) -> Any:
        if isinstance(items[0], dict):
            return {k: walk([it[k] for it in items]) for k in items[0]}
        vals = [float("nan") if v is None else float(v) for v in items]
        ok = [v for v in vals if math.isfinite(v)]
        return [float(np.mean(ok)), float(np.std(ok))] if ok else [None, None]

    return walk(runs)
