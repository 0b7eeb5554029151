"""``polymorphd train``: generalist, exits (copycat), contexts, adapters, calibration, report.

``train`` runs ``PIPELINE`` in order: each stage is trained and saved, or, when the
run's stage log says it finished, loaded, so re-running ``polymorphd train --out RUN``
skips what is done. ``models/train/run.py`` owns the RUN directory (its files and
their save/load functions; export reads it back with ``load_run``). Frames are loaded
once, at the model input size. Works under torchrun (``models/train/distributed.py``):
every rank trains its shard, rank 0 writes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymorphd.models.core.contexts import cluster_contexts, coverage
from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.core.melspec import MelConfig, log_mel
from polymorphd.models.core.metrics import label_quality
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.data.audio import split_windows
from polymorphd.models.data.tao import (
    Frame,
    TaoSplit,
    available_splits,
    load_images,
    load_split,
    split_by_video,
)
from polymorphd.models.nn.checkpoint import checkpoint_stem
from polymorphd.models.nn.checkpoint import init_from as load_init
from polymorphd.models.nn.lora import ContextAdapter, merge_
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import avexits, distributed, recipe, run, stages
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, SplitData, freeze, predict
from polymorphd.models.train.presets import Preset, get_preset
from polymorphd.models.train.pretrain import resolve_init_from
from polymorphd.models.train.report import build_report, render_markdown

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.2  # share of train videos held out for calibration when there is no validation split
# run config keys that must agree when a run is resumed
RESUME_KEYS = ("preset_config", "vit", "lora", "exits", "input", "class_ids", "seed", "init_from", "recipe")
RECIPES = (
    "default",
    "polymorph",
)  # default: the generalist fine-tuned whole; polymorph: models/train/recipe.py


# Best-epoch selection (the generalist's epochs, each adapter's) reads the first SELECT_VIDEOS calibration
# videos; calibration itself (thresholds, exit bounds, recall cuts) reads them all. On the 48 calibration videos
# of the default dataset, selecting on all of them took small's training from 274 s to 378 s on 2 cores; the
# generalist kept its last epoch either way (seed 0), 2 of 7 adapters their second epoch instead of the first.
SELECT_VIDEOS = 12


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    class_ids: list[int]
    train: SplitData
    calib: SplitData
    report: SplitData

    @property
    def select(self) -> SplitData:
        """The calibration split's first ``SELECT_VIDEOS`` videos: what best-epoch selection scores on."""
        return first_videos(self.calib, SELECT_VIDEOS)


def first_videos(split: SplitData, n: int) -> SplitData:
    """``split`` cut to its first ``n`` videos in stored order (all of it when it has no more)."""
    _, first = np.unique(split.video_ids, return_index=True)
    if len(first) <= n:
        return split
    keep = np.isin(split.video_ids, split.video_ids[np.sort(first)[:n]])
    return replace(
        split,
        images=split.images[keep],
        Y=split.Y[keep],
        video_ids=split.video_ids[keep],
        boxes=None if split.boxes is None else [b for b, k in zip(split.boxes, keep, strict=True) if k],
        counts=None if split.counts is None else split.counts[keep],
        mel=None if split.mel is None else split.mel[keep],
    )


@dataclass
class TrainResult:
    run_dir: Path
    report: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def load_boxes(split: TaoSplit, frames: list[Frame], class_ids: list[int], size: int) -> list[np.ndarray]:
    """Per frame, its annotation boxes as (n, 5) float32 [class column, x0, y0, x1, y1] at ``size`` x ``size``.

    Only copy-paste augmentation uses them, so a box that cannot be read (no bbox, no image size) is left
    out rather than failing the run; the loader has already validated everything labels depend on.
    """
    path = split.root / "annotations" / f"{split.name}.json"
    doc = json.loads(path.read_text())
    column = {cid: k for k, cid in enumerate(class_ids)}
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in doc["images"]}
    per_image: dict[int, list[list[float]]] = {}
    for a in doc["annotations"]:
        bbox, (w, h) = a.get("bbox"), sizes.get(a["image_id"], (None, None))
        ok = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
        if not ok or not w or not h or a["category_id"] not in column:
            continue
        x, y, bw, bh = bbox
        sx, sy = size / w, size / h
        per_image.setdefault(a["image_id"], []).append(
            [column[a["category_id"]], x * sx, y * sy, (x + bw) * sx, (y + bh) * sy]
        )
    return [np.asarray(per_image.get(f.image_id, []), dtype=np.float32).reshape(-1, 5) for f in frames]


def _split_data(
    split: TaoSplit,
    class_ids: list[int],
    size: int,
    progress: bool,
    boxes: bool = False,
    audio: MelConfig | None = None,
) -> SplitData:
    frames = split.annotated_frames()
    if not frames:
        raise DataError(
            f"{split.root}: split {split.name!r} has no annotated frames; nothing to train or score on"
        )
    known = set(class_ids)
    unknown = {c for f in frames for c in (f.labels or ()) if c not in known}
    if unknown:
        log.warning(
            "split %s: %d category ids are not train categories and are ignored: %s",
            split.name, len(unknown), sorted(unknown)[:10],
        )  # fmt: skip
    Y = split.multi_hot(frames, class_ids, ignore_unknown=True)
    images = load_images(frames, size, progress=progress)
    box_list = load_boxes(split, frames, class_ids, size) if boxes else None
    counts = np.array([f.count or 0 for f in frames], dtype=np.float32)
    mel = None
    if audio is not None:
        tracks = split.audio_tracks()
        if tracks and {t.sample_rate for t in tracks.values()} != {audio.sample_rate}:
            raise DataError(
                f"split {split.name!r}: audio is {sorted({t.sample_rate for t in tracks.values()})} Hz, the mel "
                f"front end expects {audio.sample_rate} Hz"
            )
        mel = np.concatenate(
            [
                log_mel(split_windows(tracks, frames[i : i + 1024], audio.samples), audio)
                for i in range(0, len(frames), 1024)
            ]
        )
    return SplitData(split.name, images, Y, np.array([f.video_id for f in frames]), box_list, counts, mel)


def load_data(
    root: str | Path, size: int, *, seed: int = 0, progress: bool = False, audio: MelConfig | None = None
) -> Dataset:
    """Train on ``train``; calibrate on ``validation`` (else held-out train videos); report on ``test``
    (else the calibration split). Frames are read once at ``size`` x ``size``; with ``audio``, each frame's
    log-mel audio window too (every video must have an audio track)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"dataset directory {root} does not exist; point --data at a TAO-format dataset "
            f"(DIR/annotations/train.json, DIR/frames/) or create one with 'polymorphd data synth --out {root}'"
        )
    found = available_splits(root)
    if "train" not in found:
        raise DataError(
            f"{root} is not a TAO-format dataset with a train split: {root / 'annotations' / 'train.json'} "
            f"is missing (splits found: {', '.join(found) or 'none'}); create one with 'polymorphd data synth'"
        )
    train = load_split(root, "train")
    if "validation" in found:
        calib = load_split(root, "validation")
    else:
        train, calib = split_by_video(train, HELDOUT_FRACTION, seed)
        log.info("no validation split: holding out %d of the train videos for calibration", len(calib.videos))
    class_ids = train.category_ids()
    if not class_ids:
        raise DataError(
            f"{root / 'annotations' / 'train.json'}: 'categories' is empty; there is nothing to learn"
        )
    sets = {"train": _split_data(train, class_ids, size, progress, boxes=True, audio=audio)}
    sets["calib"] = _split_data(calib, class_ids, size, progress, audio=audio)
    sets["report"] = (
        _split_data(load_split(root, "test"), class_ids, size, progress, audio=audio)
        if "test" in found
        else sets["calib"]
    )
    return Dataset(root, train.category_names(), class_ids, sets["train"], sets["calib"], sets["report"])


def _config(
    preset: Preset, data: Dataset, spec: InputSpec, seed: int, init_from: str | None, recipe_name: str
) -> dict[str, Any]:
    vit_cfg = preset.vit_config(len(data.class_ids))
    return {
        "preset": preset.name,
        "preset_config": preset.to_dict(),
        "vit": vit_cfg.to_dict(),
        "lora": preset.lora_config().to_dict(),
        "exits": [ec.to_dict() for ec in preset.exit_configs("slvit")],
        "input": spec.to_dict(),
        "classes": data.classes,
        "class_ids": data.class_ids,
        "seed": seed,
        "init_from": init_from,
        "dataset": str(data.root),
        "deployed_exit": {"kind": "slvit", "copycat": True},
    } | ({"recipe": recipe_name} if recipe_name != "default" else {})  # old runs resume unchanged


def _open_run(out: Path, config: dict[str, Any], env: DistEnv) -> None:
    """Start a new run directory, or resume the one at ``out`` if it was started with the same settings."""
    if run.has_config(out):
        old, new = run.load_config(out), read_json_roundtrip(config)
        diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
        if diff:
            raise ConfigError(
                f"{out} holds a run with different {', '.join(diff)} than this command asks for; resume "
                "with the same --preset/--epochs/--seed/--init-from and dataset classes, or choose a new --out"
            )
    elif env.is_main:
        run.save_config(out, config)


def read_json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons with a saved config."""
    return json.loads(json.dumps(obj))


# --- the stages -----------------------------------------------------------------------------------------


@dataclass
class Job:
    """What the stages share: the data and settings, and what each stage built for the ones after it."""

    data: Dataset
    ctx: Ctx
    init_from: str | None
    vit: VisionTransformer
    exits: list[torch.nn.Module] = field(default_factory=list)
    contexts: list[list[int]] = field(default_factory=list)
    coverage: dict[str, float] = field(default_factory=dict)
    adapters: list[ContextAdapter] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    base: VisionTransformer | None = None  # polymorph recipe: the frozen backbone the adapters sit on
    mel: MelConfig | None = None  # train --audio: the audio front end of the audiovisual exits
    av: tuple[Any, ...] = ()  # the avexits stage's (exits, calibrations, final count head)


@dataclass(frozen=True)
class Stage:
    """One step of a run. ``train`` fills the job and returns the numbers the stage log keeps; ``save``
    writes what it built through ``run`` (rank 0 only); ``load`` restores it when the stage is already
    done (None: no later stage reads it)."""

    name: str
    train: Callable[[Job], dict[str, Any]]
    save: Callable[[Path, Job], None]
    load: Callable[[Path, Job], None] | None = None


def _generalist(job: Job) -> dict[str, Any]:
    vit, d = job.vit, job.data
    notes = load_init(vit, job.init_from, num_classes=vit.cfg.num_classes) if job.init_from else []
    return stages.train_generalist(vit, d.train, d.select, d.report, job.ctx) | {"init_notes": notes}


def _exits(job: Job) -> dict[str, Any]:
    d = job.data
    modules, results = stages.train_exits(job.vit, d.train, d.calib, d.report, job.ctx)
    variants = stages.exit_variants(job.ctx.preset)  # every variant is reported, only SL-ViT copycat deployed
    job.exits = [
        m for m, (kind, copycat, _) in zip(modules, variants, strict=True) if kind == "slvit" and copycat
    ]
    return {"variants": results}


def _load_exits(out: Path, job: Job) -> None:
    job.exits = run.load_exits(out, job.vit.cfg, job.ctx.preset.exit_configs("slvit"), job.ctx.env.device)


def _contexts(job: Job) -> dict[str, Any]:
    Y = job.data.train.Y
    job.contexts = cluster_contexts(Y, max_size=job.ctx.preset.max_context_size)
    job.coverage = coverage(Y, job.contexts)
    return {
        "contexts": job.contexts,
        "coverage": job.coverage,
        "coverage_report": coverage(job.data.report.Y, job.contexts),
    }


def _load_contexts(out: Path, job: Job) -> None:
    job.contexts = run.load_contexts(out)


def _adapters(job: Job) -> dict[str, Any]:
    d = job.data
    job.adapters, results = stages.train_adapters(job.vit, job.contexts, d.train, d.select, d.report, job.ctx)
    return {"adapters": results}


def _calibration(job: Job) -> dict[str, Any]:
    job.calibration = stages.calibrate(job.vit, job.exits, job.data.calib, job.ctx)
    return job.calibration


# In order; a stage may read what the stages before it built.
PIPELINE = (
    Stage(
        "generalist",
        _generalist,
        save=lambda out, job: run.save_backbone(out, job.vit),
        load=lambda out, job: run.load_backbone(out, job.vit, job.ctx.env.device),
    ),
    Stage("exits", _exits, save=lambda out, job: run.save_exits(out, job.exits), load=_load_exits),
    Stage(
        "contexts",
        _contexts,
        save=lambda out, job: run.save_contexts(out, job.contexts, job.coverage),
        load=_load_contexts,
    ),
    Stage("adapters", _adapters, save=lambda out, job: run.save_adapters(out, job.adapters)),
    Stage("calibration", _calibration, save=lambda out, job: run.save_calibration(out, job.calibration)),
)
STAGES = tuple(s.name for s in PIPELINE)


def _polymorph_generalist(job: Job) -> dict[str, Any]:
    """The pretrained backbone frozen as the base; the generalist = base + one LoRA + head, merged into vit."""
    vit, d = job.vit, job.data
    notes = load_init(vit, job.init_from, num_classes=vit.cfg.num_classes) if job.init_from else []
    job.base = copy.deepcopy(vit)
    # the adapters' total budget: as many adapter budgets as the contexts stage will cluster contexts
    scale = len(cluster_contexts(d.train.Y, max_size=job.ctx.preset.max_context_size))
    adapter, res = recipe.train_generalist(job.base, d.train, d.calib, d.report, job.ctx, scale)
    merge_(vit, adapter)
    freeze(vit)
    return res | {"init_notes": notes, "recipe": "polymorph"}


def _save_polymorph_generalist(out: Path, job: Job) -> None:
    run.save_backbone(out, job.vit)
    assert job.base is not None
    run.save_adapter_base(out, job.base)


def _load_polymorph_generalist(out: Path, job: Job) -> None:
    run.load_backbone(out, job.vit, job.ctx.env.device)
    job.base = run.load_adapter_base(out, copy.deepcopy(job.vit), job.ctx.env.device)


def _polymorph_adapters(job: Job) -> dict[str, Any]:
    d = job.data
    assert job.base is not None, "the polymorph generalist stage sets the base"
    job.adapters, res = recipe.train_adapters(
        job.base, job.vit, job.contexts, d.train, d.calib, d.report, job.ctx
    )
    return res


# The method's setting (models/train/recipe.py): same stages, frozen base, LoRA generalist and adapters.
POLYMORPH_PIPELINE = (
    Stage("generalist", _polymorph_generalist, _save_polymorph_generalist, _load_polymorph_generalist),
    *PIPELINE[1:3],
    Stage("adapters", _polymorph_adapters, save=lambda out, job: run.save_adapters(out, job.adapters)),
    PIPELINE[4],
)
PIPELINES = {"default": PIPELINE, "polymorph": POLYMORPH_PIPELINE}


def _avexits(job: Job) -> dict[str, Any]:
    """train --audio: audiovisual exits with count heads beside the deployed visual ones (models/train/avexits)."""
    assert job.mel is not None
    d = job.data
    exits, cals, final, measured = avexits.train_deployed(
        job.vit, d.train, d.calib, d.report, job.ctx, job.mel
    )
    job.av = (exits, cals, final)
    return measured


AUDIO_STAGE = Stage("avexits", _avexits, save=lambda out, job: run.save_avexits(out, job.mel, *job.av))


def _run_stage(
    stage: Stage, seed: int, job: Job, out: Path, stage_log: run.StageLog, result: TrainResult
) -> None:
    """Load ``stage`` if the stage log says it is done, else train it, save it (rank 0) and record it."""
    if stage_log.done(stage.name):
        if stage.load is not None:
            stage.load(out, job)
        result.skipped.append(stage.name)
        log.info("stage %s: already done, skipped", stage.name)
        return
    env = job.ctx.env
    torch.manual_seed(seed)  # per stage, so a resumed stage trains exactly as in an uninterrupted run
    start = time.perf_counter()
    res = stage.train(job)
    if env.is_main:
        stage.save(out, job)
    distributed.barrier(env)
    secs = time.perf_counter() - start
    stage_log.record(stage.name, secs, res)
    result.ran.append(stage.name)
    log.info("stage %s done in %.1f s", stage.name, secs)


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    preset: Preset,
    *,
    seed: int = 0,
    init_from: str | None = None,
    env: DistEnv | None = None,
    progress: bool = True,
    recipe_name: str = "default",
    audio: bool = False,
) -> TrainResult:
    """Run (or resume) every stage and write the run directory; returns the report and which stages ran."""
    if recipe_name not in PIPELINES:
        raise ConfigError(f"unknown recipe {recipe_name!r}: choose one of {', '.join(PIPELINES)}")
    if recipe_name == "polymorph":
        preset = recipe.recipe_preset(preset)
    env = env or DistEnv()
    out = Path(out_dir)
    if init_from:
        # the checkpoint's stem: timm and Hugging Face ViTs have the patch embedding, ours records its own
        stem = checkpoint_stem(init_from)
        if preset.stem != stem:
            preset = replace(preset, stem=stem)
    t0 = time.perf_counter()
    mel = MelConfig() if audio else None
    data = load_data(data_dir, preset.img_size, seed=seed, progress=progress and env.is_main, audio=mel)
    preset = preset.for_frames(len(data.train.Y))
    load_s = time.perf_counter() - t0
    spec = InputSpec(size=preset.img_size)
    # audio adds a stage and its own self-describing file (avexits.pt), not a config key: so a finished run
    # resumed with --audio (on the same frames with sound) only trains the audiovisual exits
    _open_run(out, _config(preset, data, spec, seed, init_from, recipe_name), env)
    distributed.barrier(env)
    stage_log = run.StageLog(out, write=env.is_main)
    log.info(
        "training %s on %s: %d classes, %d/%d/%d frames (train/%s/%s), device %s, world %d",
        preset.name, data.root, len(data.classes), len(data.train.Y), len(data.calib.Y), len(data.report.Y),
        data.calib.name, data.report.name, env.device, env.world_size,
    )  # fmt: skip

    torch.manual_seed(seed)
    ctx = Ctx(spec=spec, preset=preset, env=env, seed=seed, progress=progress)
    job = Job(data, ctx, init_from, VisionTransformer(preset.vit_config(len(data.class_ids))).to(env.device))
    job.mel = mel
    result = TrainResult(out, {})
    pipeline = PIPELINES[recipe_name]
    for i, stage in enumerate((*pipeline, AUDIO_STAGE) if audio else pipeline):
        _run_stage(stage, seed + i, job, out, stage_log, result)

    meta = {
        "dataset": str(data.root),
        "num_classes": len(data.classes),
        "classes": data.classes,
        "splits": {
            key: {
                "name": s.name,
                "frames": len(s.Y),
                "videos": s.videos,
                "mean_labels": float(np.mean(s.Y.sum(1))),
            }
            for key, s in (("train", data.train), ("calibration", data.calib), ("report", data.report))
        },
        "device": str(env.device),
        "world_size": env.world_size,
        "threads": torch.get_num_threads(),
        "load_data_seconds": round(load_s, 2),
    }
    result.report = build_report(
        meta=meta,
        records=stage_log.records,
        vit=job.vit,
        preset=preset,
        generalist_labels=generalist_labels(job, stage_log.records["calibration"]["result"]),
    )
    if audio:  # the audiovisual exits beside their visual twins, on the report split (avexits.measure)
        result.report["audio"] = stage_log.records[AUDIO_STAGE.name]["result"]
    if env.is_main:
        run.save_report(out, result.report, render_markdown(result.report))
    log.info(
        "run %s complete in %.1f s (ran %s)",
        out,
        time.perf_counter() - t0,
        ", ".join(result.ran) or "nothing",
    )
    return result


def generalist_labels(job: Job, calibration: dict[str, Any]) -> dict[str, float]:
    """The final classifier's label F1 and exact match on the report split at the calibrated class thresholds
    (what the manifest publishes with); one pass over the report frames, so a resumed run measures it too."""
    thresholds = np.asarray(calibration["class_thresholds"])
    return label_quality(predict(job.vit, job.data.report.images, job.ctx) > thresholds, job.data.report.Y)


def _summary(r: dict[str, Any], out: Path) -> list[str]:
    lines = [
        f"run written to {out} ({run.REPORT_MD}, {run.REPORT_JSON})",
        f"  generalist mAP {_num(r['generalist'].get('map'))}, label F1 {_num(r['generalist'].get('label_f1'))}, "
        f"exact match {_num(r['generalist'].get('exact_match'))} ({r['splits']['report']['name']})",
    ]
    for e in r["exits"]:
        cc = "copycat" if e["copycat"] else "labels "
        lines.append(
            f"  exit after {e['after_block']}: {e['kind']:5s} {cc} mAP {_num(e['map'])}, "
            f"label F1 {_num(e.get('label_f1'))}"
        )
    gains = [(a["map_adapter"] or 0) - (a["map_generalist"] or 0) for a in r["adapters"]]
    lines.append(
        f"  {len(r['contexts'])} contexts, coverage k=1 {_num(r['coverage'].get('1'))}; "
        f"adapters vs generalist mAP {np.mean(gains) if gains else 0:+.4f} on average"
    )
    rec = r.get("recipe")
    if rec:
        for name in ("generalist", "adapters_everywhere", "full_tail"):
            m = rec[name]
            lines.append(
                f"  {name}: mAP {_num(m.get('map'))}, label F1 {_num(m.get('label_f1'))} (all classes)"
            )
    lines.append(
        f"  wall time {r['timings']['total']:.1f} s in stages (+ {r['load_data_seconds']:.1f} s loading)"
    )
    return lines


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def cli_train(args: argparse.Namespace) -> int:
    """``polymorphd train --data DIR --out RUN [--preset P] [--epochs N] [--threads T] [--init-from F] [--seed S]``."""
    preset = get_preset(args.preset, args.epochs)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    init_from = resolve_init_from(args.init_from, preset.name)
    env = distributed.setup(os.environ)
    try:
        res = train(
            args.data, args.out, preset, seed=args.seed, init_from=init_from, env=env,
            recipe_name=getattr(args, "recipe", "default"),
            audio=getattr(args, "audio", False),
        )  # fmt: skip
    finally:
        distributed.teardown(env)
    if env.is_main:
        print("\n".join(_summary(res.report, res.run_dir)))
    return 0
