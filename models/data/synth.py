"""Synthetic multi-label video, written in TAO format. Torch-free (numpy + OpenCV).

Makes real the three properties the Polymorph method (WACV 2026, arXiv
2507.14959) exploits: label sparsity (a few of many classes per frame),
temporal continuity (a scene lasts many frames; objects persist, move smoothly
and only occasionally enter or leave) and co-occurrence (each scene draws its
objects from one context, a group of classes; groups overlap a little and a few
hub classes belong to several). Appearance comes from sprites.py, backgrounds
from backgrounds.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.data import backgrounds, sprites, tao
from polymorphd.models.data.audio import write_wav
from polymorphd.models.data.soundscape import AudioConfig, render_soundscape

log = logging.getLogger(__name__)

CATEGORY_ID_BASE, CATEGORY_ID_STRIDE = 1000, 7  # LVIS-like: sparse, non-contiguous category ids
SPLITS = ("train", "validation", "test")
# Videos per split of the default dataset. At a fixed training budget more distinct videos score better once
# the backbone starts pretrained (bench/data_curve.py; docs/ARCHITECTURE.md, "Data at the scale the compute
# affords"). 48 calibration and 48 test videos, not 12: per video, label F1 varies with std 0.17, so 12 test
# videos put a 95 % interval about 4 points wide on the early exit's mAP cost (a 1-point tolerance cannot be
# read from it), and decision thresholds fit on 48 videos raised test label F1 by 0.012 (docs/ARCHITECTURE.md,
# "How many videos a number needs"). Video seeds run train, validation, test: train stays the same videos.
DEFAULT_VIDEOS = (144, 48, 48)
HALO = 0.6  # how much the dark outline under each object darkens the background: contrast on any scene
JPEG_QUALITY = 95
BACKGROUND_STREAM = 7919  # separates the background pool's seeds from the videos' seeds
AUDIO_STREAM = 0xA0D1  # the audio track's own random stream: frames are the same with or without --audio


@dataclass(frozen=True)
class SynthConfig:
    num_classes: int = 32
    num_contexts: int = 6
    width: int = 128
    height: int = 128
    frames_per_video: int = 60
    min_objects: int = 1
    max_objects: int = 3
    scene_length: tuple[int, int] = (24, 72)  # frames per scene (min, max): long scenes = temporal continuity
    change_prob: float = 0.02  # per frame: chance one object enters or leaves the scene
    outside_prob: float = (
        0.03  # chance a new object comes from outside the scene's context (real-world noise)
    )
    overlap: int = 1  # classes each context shares with the next one
    hubs: int = 2  # classes that belong to several contexts (like "person" in TAO)
    hub_contexts: int = 3  # how many contexts each hub belongs to (at most all of them)
    object_size: tuple[float, float] = (0.28, 0.45)  # of min(width, height); >= 18 px at a 64x64 model input
    max_speed: float = 0.02  # of min(width, height) per frame
    sources: tuple[str, ...] = sprites.SOURCES
    # exemplar images per class (0 = every one available): a small closed world that a model can learn from
    # a few dozen videos, as a fixed camera sees the same few object types again and again
    exemplars: int = 8
    class_colours: bool = True  # each class has its typical hue (+-10 of 180); False: any hue for any object
    background: str | None = None  # a video file; None = procedural
    # procedural backgrounds shared by all scenes (0 = a new one per scene). A backdrop that recurs under every
    # context carries no label information; one per scene lets a model learn scenes by their backdrop instead
    # of their objects (measured: test mAP stuck near the label priors while train loss fell)
    background_pool: int = 8
    seed: int = 0  # fixes the context groups; each video has its own seed on top

    def __post_init__(self) -> None:
        for name in ("scene_length", "object_size", "sources"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        ints = {"num_classes": 1, "num_contexts": 1, "width": 16, "height": 16, "frames_per_video": 1}
        ints |= {
            "min_objects": 0,
            "max_objects": 1,
            "overlap": 0,
            "hubs": 0,
            "hub_contexts": 1,
            "exemplars": 0,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"SynthConfig.{name} must be an integer >= {lo}, got {v!r}")
        self._check(
            bool(self.sources) and set(self.sources) <= set(sprites.ALL_SOURCES),
            "sources",
            f"some of {sprites.ALL_SOURCES}",
        )
        self._check(
            self.num_classes <= sprites.max_classes(self.sources),
            "num_classes",
            f"at most {sprites.max_classes(self.sources)} (every class of the sources {list(self.sources)})",
        )
        self._check(
            self.num_contexts <= self.num_classes, "num_contexts", f"at most num_classes={self.num_classes}"
        )
        self._check(self.min_objects <= self.max_objects, "min_objects", f"<= max_objects={self.max_objects}")
        self._check(self.hubs < self.num_classes, "hubs", f"< num_classes={self.num_classes}")
        ok = len(self.scene_length) == 2 and all(isinstance(v, int) for v in self.scene_length)
        lo, hi = self.scene_length if ok else (0, 0)
        self._check(1 <= lo <= hi, "scene_length", "(min, max) integers with 1 <= min <= max")
        ok = len(self.object_size) == 2 and all(isinstance(v, (int, float)) for v in self.object_size)
        lo, hi = self.object_size if ok else (0, 0)
        self._check(
            0.05 <= lo <= hi <= 0.6, "object_size", "(min, max) fractions with 0.05 <= min <= max <= 0.6"
        )
        for name in ("change_prob", "outside_prob"):
            self._check(0.0 <= getattr(self, name) <= 1.0, name, "a probability in [0, 1]")
        self._check(0.0 < self.max_speed <= 0.2, "max_speed", "in (0, 0.2] (fraction of the frame per frame)")
        smallest = min(len(g) for g in context_groups(self))
        self._check(
            smallest >= self.max_objects,
            "num_contexts",
            f"small enough that every context has >= max_objects={self.max_objects} classes "
            f"(the smallest has {smallest}); use fewer contexts, more classes or more overlap",
        )

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"SynthConfig.{name} must be {expected}, got {getattr(self, name)!r}")


class ObjectBox(NamedTuple):
    track_id: int  # unique within the video
    class_index: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels


@dataclass(frozen=True)
class SynthFrame:
    image: np.ndarray  # (H, W, 3) uint8 BGR
    labels: tuple[int, ...]  # class indices 0..K-1, sorted
    objects: tuple[ObjectBox, ...] = ()
    frame_index: int = 0
    context: int = 0  # the scene's context (index into context_groups)
    scene: int = 0  # scene number within the video


def class_names(cfg: SynthConfig) -> list[str]:
    """Readable class names ("fmnist/trouser", "digit/3", "glyph/K") from the installed sources."""
    names = sprites.available_class_names(cfg.sources)
    if cfg.num_classes > len(names):
        sprites.build_bank(cfg.num_classes, cfg.sources)  # raises the ConfigError that says what is missing
    return names[: cfg.num_classes]


def check_class_names(cfg: SynthConfig, expected: Sequence[str]) -> None:
    """Raise ConfigError unless this machine generates exactly ``expected`` (e.g. a bundle's classes).

    The class list depends on which sources are installed, so a board without
    fashion-mnist or scikit-learn renders other classes than a workstation.
    """
    names = class_names(cfg)
    if list(expected) != names:
        i = next(
            (k for k, (a, b) in enumerate(zip(names, expected, strict=False)) if a != b),
            min(len(names), len(expected)),
        )
        got, want = (
            (names[i] if i < len(names) else "nothing"),
            (expected[i] if i < len(expected) else "nothing"),
        )
        raise ConfigError(
            f"the synthetic source generates {len(names)} classes here but {len(expected)} are expected; "
            f"class {i} is {got!r}, expected {want!r}: install the missing source (fashion-mnist: Debian "
            "dataset-fashion-mnist; digit: scikit-learn) or train on a dataset generated on this machine"
        )


def category_ids(cfg: SynthConfig) -> list[int]:
    return [CATEGORY_ID_BASE + CATEGORY_ID_STRIDE * k for k in range(cfg.num_classes)]


def context_groups(cfg: SynthConfig) -> list[list[int]]:
    """The ground-truth class groups the generator draws scenes from (sorted class indices)."""
    rng = np.random.default_rng([cfg.seed, 0xC0])
    perm = rng.permutation(cfg.num_classes).tolist()
    hubs, rest = perm[: cfg.hubs], perm[cfg.hubs :]
    cores = [list(map(int, c)) for c in np.array_split(np.array(rest, dtype=int), cfg.num_contexts)]
    groups = [set(c) for c in cores]
    if cfg.num_contexts > 1:
        for i, g in enumerate(groups):
            g.update(cores[(i + 1) % cfg.num_contexts][: cfg.overlap])
    for h in hubs:
        for c in rng.choice(
            cfg.num_contexts, min(cfg.hub_contexts, cfg.num_contexts), replace=False
        ).tolist():
            groups[c].add(h)
    return [sorted(g) for g in groups]


def _pick_class(
    cfg: SynthConfig, group: list[int], present: set[int], rng: np.random.Generator
) -> int | None:
    inside = [c for c in group if c not in present]
    if rng.random() < cfg.outside_prob:
        outside = [c for c in range(cfg.num_classes) if c not in present and c not in group]
        if outside:
            return int(rng.choice(outside))
    return int(rng.choice(inside)) if inside else None


def _spawn(
    cfg: SynthConfig,
    bank: sprites.ClassBank,
    group: list[int],
    objs: list[sprites.SceneObject],
    track_id: int,
    rng: np.random.Generator,
) -> int:
    """Add one object of a class not yet in the scene (if any is left); return the next track id."""
    cls = _pick_class(cfg, group, {o.cls for o in objs}, rng)
    if cls is None:
        return track_id
    side = min(cfg.width, cfg.height)
    obj = sprites.make_object(
        bank, cls, track_id, int(rng.uniform(*cfg.object_size) * side), rng, cfg.exemplars, cfg.class_colours
    )
    sprites.place(obj, objs, cfg.width, cfg.height, cfg.max_speed * side, rng)
    objs.append(obj)
    return track_id + 1


def render_video(cfg: SynthConfig, video_seed: int) -> Iterator[SynthFrame]:
    """The frames of one video: scenes one after another, each from one context. Same seeds, same frames."""
    bank = sprites.build_bank(cfg.num_classes, cfg.sources)
    groups = context_groups(cfg)
    footage = backgrounds.load_video_frames(cfg.background, cfg.width, cfg.height) if cfg.background else None
    rng = np.random.default_rng([cfg.seed, video_seed])
    vmax = cfg.max_speed * min(cfg.width, cfg.height)
    t, scene, next_track = 0, 0, 0
    while t < cfg.frames_per_video:
        length = min(
            int(rng.integers(cfg.scene_length[0], cfg.scene_length[1] + 1)), cfg.frames_per_video - t
        )
        ctx = int(rng.integers(cfg.num_contexts))
        if footage is not None:
            bg = backgrounds.video_clip(footage, length, rng)
        else:
            canvas_rng = None
            if cfg.background_pool:
                pick = int(rng.integers(cfg.background_pool))
                canvas_rng = np.random.default_rng([cfg.seed, BACKGROUND_STREAM, pick])
            bg = backgrounds.procedural_clip(cfg.width, cfg.height, length, rng, canvas_rng)
        objs: list[sprites.SceneObject] = []
        for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
            next_track = _spawn(cfg, bank, groups[ctx], objs, next_track, rng)
        for i, back in enumerate(bg):
            if i > 0:
                if rng.random() < cfg.change_prob:
                    grow = len(objs) < cfg.max_objects and (
                        len(objs) <= cfg.min_objects or rng.random() < 0.5
                    )
                    if grow:
                        next_track = _spawn(cfg, bank, groups[ctx], objs, next_track, rng)
                    elif len(objs) > cfg.min_objects:
                        objs.pop(int(rng.integers(len(objs))))
                sprites.step(objs, cfg.width, cfg.height, vmax, rng)
            image = back.copy()
            boxes = tuple(ObjectBox(o.track_id, o.cls, sprites.draw(image, o, HALO)) for o in objs)
            labels = tuple(sorted({o.cls for o in objs}))
            yield SynthFrame(image, labels, boxes, t + i, ctx, scene)
        t += length
        scene += 1


class SynthStream:
    """Endless live stream for the daemon's ``synthetic:`` source: video after video."""

    def __init__(self, cfg: SynthConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed
        self.class_names: list[str] = class_names(cfg)
        self.context_groups: list[list[int]] = context_groups(cfg)
        sprites.build_bank(cfg.num_classes, cfg.sources)  # load assets now: fail fast, no stall mid-stream
        if cfg.background:
            backgrounds.load_video_frames(cfg.background, cfg.width, cfg.height)

    def __iter__(self) -> Iterator[SynthFrame]:
        # Video seeds from 2**32 up never collide with write_dataset's (0, 1, 2, ...).
        seeds = np.random.default_rng([self.cfg.seed, self.seed, 0x57])
        while True:
            yield from render_video(self.cfg, int(seeds.integers(2**32, 2**62)))


@dataclass(frozen=True)
class LabelStats:
    frames: int
    mean_labels: float  # labels per frame
    min_labels: int
    max_labels: int
    persistence: float  # of the labels of a frame, the fraction still present in the next frame
    within_context: (
        float  # of co-occurring label pairs, the fraction that share a context group (nan if none)
    )


def label_statistics(
    videos: Iterable[Sequence[Iterable[int]]], groups: Sequence[Iterable[int]]
) -> LabelStats:
    """Sparsity, continuity and co-occurrence of label sets, video by video, frames in order."""
    same = [set(g) for g in groups]
    counts: list[int] = []
    kept = total = within = pairs = 0
    for video in videos:
        prev: set[int] | None = None
        for labels in video:
            cur = set(labels)
            counts.append(len(cur))
            if prev is not None:
                kept += len(prev & cur)
                total += len(prev)
            srt = sorted(cur)
            for i, a in enumerate(srt):
                for b in srt[i + 1 :]:
                    pairs += 1
                    within += any(a in g and b in g for g in same)
            prev = cur
    return LabelStats(
        frames=len(counts),
        mean_labels=float(np.mean(counts)) if counts else float("nan"),
        min_labels=min(counts, default=0),
        max_labels=max(counts, default=0),
        persistence=kept / total if total else float("nan"),
        within_context=within / pairs if pairs else float("nan"),
    )


def _check_write_args(videos: Sequence[int], annotate_every: int) -> tuple[int, ...]:
    counts = tuple(videos)
    if len(counts) != 3 or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts):
        raise ConfigError(f"videos must be three counts >= 0 (train, validation, test), got {videos!r}")
    if sum(counts) == 0:
        raise ConfigError("videos must ask for at least one video, got (0, 0, 0)")
    if not isinstance(annotate_every, int) or isinstance(annotate_every, bool) or annotate_every < 1:
        raise ConfigError(f"annotate_every must be an integer >= 1, got {annotate_every!r}")
    return counts


def write_dataset(
    out_dir: str | Path,
    cfg: SynthConfig,
    videos: Sequence[int] = DEFAULT_VIDEOS,
    annotate_every: int = 1,
    *,
    progress: bool = True,
    audio: AudioConfig | None = None,
) -> Path:
    """Write DIR/annotations/{train,validation,test}.json and DIR/frames/<split>/<video>/<frame:06d>.jpg.

    TAO-like: sparse category ids, a shuffled ``images`` list, only every
    ``annotate_every``-th frame annotated (every frame is written), one track
    per object instance, bbox [x, y, w, h]. A split with 0 videos is not written.
    With ``audio``, also DIR/frames/<split>/<video>.wav beside each video's frames, referenced from its
    ``videos`` entry (``fps`` and ``audio``: models/data/audio.py); the frames are the same as without.
    """
    counts = _check_write_args(videos, annotate_every)
    _check_empty_out(Path(out_dir))
    names, cids, groups = class_names(cfg), category_ids(cfg), context_groups(cfg)
    if cfg.background:
        backgrounds.load_video_frames(cfg.background, cfg.width, cfg.height)  # fail before writing anything
    info = {
        "description": "polymorphd synthetic multi-label video (TAO format)",
        "config": asdict(cfg),
        "annotate_every": annotate_every,
        "contexts": [[cids[k] for k in g] for g in groups],
    }
    if audio is not None:
        info["audio"] = audio.to_dict()
    categories = [{"id": c, "name": n} for c, n in zip(cids, names, strict=True)]
    return write_videos(
        Path(out_dir), counts, lambda seed: render_video(cfg, seed), categories, info,
        (cfg.width, cfg.height, cfg.frames_per_video), annotate_every, cfg.seed, progress=progress, audio=audio,
    )  # fmt: skip


def _check_empty_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out}: output exists and is not an empty directory; choose a new --out or remove it"
        )


def write_videos(
    out: Path,
    counts: Sequence[int],
    render: Callable[[int], Iterable[SynthFrame]],
    categories: list[dict],
    info: dict,
    geometry: tuple[int, int, int],
    annotate_every: int,
    seed: int,
    *,
    progress: bool = True,
    scene_context: bool = False,
    audio: AudioConfig | None = None,
) -> Path:
    """The TAO writer behind ``write_dataset`` and the tao profile: ``render(video_seed)`` gives each video's
    frames (class indices index ``categories``), ``geometry`` is (width, height, frames per video).
    ``scene_context``: each image entry also records its scene's ground-truth ``context`` (an extra key).
    ``audio``: also a WAV per video from the objects each frame holds (``write_dataset``)."""
    from tqdm import tqdm

    _check_empty_out(out)
    width, height, frames_per_video = geometry
    cids = [c["id"] for c in categories]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    next_image = next_ann = next_track = 1
    video_seed = 0
    bar = tqdm(total=sum(counts) * frames_per_video, desc="synth", unit="frame", disable=not progress)
    for split_no, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
        if count == 0:
            continue
        vids, images, anns, tracks = [], [], [], []
        for _ in range(count):
            vid, name = video_seed + 1, f"{split}/synth_{video_seed:05d}"
            (out / "frames" / name).mkdir(parents=True)
            entry = {"id": vid, "name": name, "width": width, "height": height, "seed": video_seed}
            vids.append(entry)
            track_ids: dict[int, int] = {}
            heard: list[tuple[int, list[tuple[int, int]]]] = []
            for fr in render(video_seed):
                if audio is not None:
                    heard.append((fr.scene, [(o.track_id, o.class_index) for o in fr.objects]))
                file_name = f"{name}/{fr.frame_index:06d}.jpg"
                ok, buf = cv2.imencode(".jpg", fr.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                assert ok, "JPEG encoding of a uint8 BGR image cannot fail"
                (out / "frames" / file_name).write_bytes(buf.tobytes())
                bar.update()
                if fr.frame_index % annotate_every:
                    continue
                images.append(
                    {"id": next_image, "video_id": vid, "frame_index": fr.frame_index, "file_name": file_name,
                     "width": width, "height": height} | ({"context": fr.context} if scene_context else {})
                )  # fmt: skip
                for ob in fr.objects:
                    if ob.track_id not in track_ids:
                        track_ids[ob.track_id] = next_track
                        tracks.append(
                            {"id": next_track, "category_id": cids[ob.class_index], "video_id": vid}
                        )
                        next_track += 1
                    x, y, w, h = (round(v, 2) for v in ob.bbox)
                    anns.append(
                        {"id": next_ann, "image_id": next_image, "video_id": vid, "category_id": cids[ob.class_index],
                         "track_id": track_ids[ob.track_id], "bbox": [x, y, w, h], "area": round(w * h, 2),
                         "iscrowd": 0}
                    )  # fmt: skip
                    next_ann += 1
                next_image += 1
            if audio is not None:
                rng = np.random.default_rng([seed, video_seed, AUDIO_STREAM])
                write_wav(out / "frames" / f"{name}.wav", render_soundscape(audio, len(categories), heard, rng),
                          audio.sample_rate)  # fmt: skip
                entry["fps"] = audio.fps
                entry["audio"] = {"file_name": f"{name}.wav", "sample_rate": audio.sample_rate}
            video_seed += 1
        order = np.random.default_rng([seed, split_no, 0x5A]).permutation(len(images)).tolist()
        doc = {
            "info": info, "videos": vids, "images": [images[i] for i in order], "annotations": anns,
            "tracks": tracks, "categories": categories, "licenses": [],
        }  # fmt: skip
        path = out / "annotations" / f"{split}.json"
        path.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
        log.info("wrote %s: %d videos, %d annotated frames", path, len(vids), len(images))
    bar.close()
    return out


def dataset_label_sets(root: str | Path) -> dict[str, list[list[frozenset[int]]]]:
    """Per split, per video, the label sets (category ids) of the annotated frames, in frame order."""
    out = {}
    for split in tao.available_splits(root):
        data = tao.load_split(root, split, check_files=False)
        out[split] = [[f.labels for f in v.frames if f.labels is not None] for v in data.videos]
    return out


def cli_synth(args: argparse.Namespace) -> int:
    """``polymorphd data synth``: write a dataset, then print a short summary of what it holds."""
    if getattr(args, "profile", "default") == "tao":
        from polymorphd.models.data.taolike import cli_synth_tao

        return cli_synth_tao(args)
    size = args.size or (128, 128)
    cfg = SynthConfig(
        num_classes=args.classes or 32, num_contexts=args.contexts or 6, frames_per_video=args.frames or 60,
        width=size[0], height=size[1], background=args.background, seed=args.seed,
        sources=tuple(getattr(args, "sources", None) or sprites.SOURCES),
    )  # fmt: skip
    videos = tuple(args.videos) if args.videos else DEFAULT_VIDEOS
    audio = AudioConfig() if getattr(args, "audio", False) else None
    out = write_dataset(args.out, cfg, videos, args.annotate_every, progress=True, audio=audio)
    names, groups, cids = class_names(cfg), context_groups(cfg), category_ids(cfg)
    per_split = dataset_label_sets(out)
    stats = label_statistics(
        [v for videos in per_split.values() for v in videos], [[cids[k] for k in g] for g in groups]
    )
    per_source = {s: sum(n.startswith(f"{s}/") for n in names) for s in cfg.sources}
    sizes = [len(g) for g in groups]
    written = sum(videos) * cfg.frames_per_video
    print(f"wrote synthetic TAO dataset to {out}")
    if audio is not None:
        print(
            f"  audio: one {audio.sample_rate} Hz WAV per video beside its frames, {audio.fps:g} frames/s "
            f"({cfg.frames_per_video / audio.fps:g} s a video)"
        )
    print(f"  classes: {len(names)} ({', '.join(f'{s} {n}' for s, n in per_source.items() if n)})")
    print(f"  contexts: {len(groups)} ({min(sizes)}-{max(sizes)} classes each, {cfg.hubs} hub classes)")
    print(
        f"  frames: {written} written, {stats.frames} annotated ("
        + ", ".join(f"{s} {sum(len(v) for v in vids)}" for s, vids in per_split.items())
        + ")"
    )
    print(
        f"  labels/frame: mean {stats.mean_labels:.2f} (range {stats.min_labels}-{stats.max_labels}); "
        f"persistence {stats.persistence:.3f}; co-occurring pairs within a context {stats.within_context:.1%}"
    )
    return 0
