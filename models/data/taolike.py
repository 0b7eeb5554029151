"""``data synth --profile tao``: a synthetic benchmark built like TAO, the setting the Polymorph method targets.

TAO (Dave et al., ECCV 2020, arXiv 2005.10356) has 2,907 videos of about half a minute, 833 categories
with LVIS names and a long tail, annotated at about one frame per second; each category carries LVIS's
``frequency`` bucket ("f" frequent, "c" common, "r" rare; LVIS v1 has 405 / 461 / 337 of its 1,203
categories in them). Polymorph (WACV 2026, arXiv 2507.14959) exploits what such video has: few labels per
frame, labels that persist, and scenes that imply their objects. This profile reproduces each property at
a size two CPU cores can train on (docs/ARCHITECTURE.md, "A TAO-like benchmark profile"):

- classes: appearances from the default sources (fashion-mnist, digits, glyphs) each used by up to two
  classes of different typical hue: look-alike pairs, always placed in different contexts;
- LVIS-like buckets in LVIS v1's proportions, sampled with bucket weights so frequent classes dominate;
- contexts: every non-hub class belongs to one context; a few frequent hub classes (TAO's "person") to
  several; scenes draw their objects from one context and have that context's own backdrops;
- videos have a home context and move to another one between scenes, and back;
- 1-3 objects per frame that persist for a whole scene.

Torch-free (numpy + OpenCV); frames are written by ``synth.write_videos``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polymorphd.models.core.errors import ConfigError
from polymorphd.models.data import backgrounds, sprites, synth
from polymorphd.models.data.synth import HALO, ObjectBox, SynthFrame

log = logging.getLogger(__name__)

BUCKETS = ("f", "c", "r")  # LVIS's frequency codes, as TAO's categories carry them
LVIS_V1_BUCKETS = (405, 461, 337)  # frequent, common, rare categories of LVIS v1
# Videos per split: 3,600 annotated training frames keep one adapter's training to seconds on the cached
# trunk tokens; 24 test videos hold every context several times.
TAO_VIDEOS = (120, 24, 24)
CATEGORY_ID_BASE, CATEGORY_ID_STRIDE = 2000, 3  # sparse like LVIS's, and not the default dataset's ids


@dataclass(frozen=True)
class TaoProfile:
    num_classes: int = 120
    num_contexts: int = 12
    # share of classes per bucket (frequent, common, rare): LVIS v1's 405/461/337 of 1,203
    bucket_shares: tuple[float, float, float] = tuple(n / sum(LVIS_V1_BUCKETS) for n in LVIS_V1_BUCKETS)
    # sampling weight of a class of each bucket inside its context: the long tail of per-class frames
    bucket_weights: tuple[float, float, float] = (1.0, 0.2, 0.04)
    hubs: int = 2  # frequent classes in several contexts, like TAO's person
    hub_contexts: int = 6
    width: int = 64  # the small model's input size: no resize, and rendering stays cheap
    height: int = 64
    frames_per_video: int = 60
    min_objects: int = 1
    max_objects: int = 3
    scene_length: tuple[int, int] = (20, 40)  # two to three scenes per video
    move_prob: float = 0.5  # per scene after the first: the video moves to another context (else home)
    change_prob: float = 0.03  # per frame: one object enters or leaves
    outside_prob: float = 0.02  # a new object from outside the scene's context
    object_size: tuple[float, float] = (0.3, 0.45)
    max_speed: float = 0.02
    exemplars: int = 8
    backdrops: int = 2  # procedural backdrops per context: a scene's backdrop implies its context
    background: str | None = None  # real video: each context gets its own stretch of the footage
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("bucket_shares", "bucket_weights", "scene_length", "object_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        appearances = sprites.max_classes(sprites.SOURCES)
        checks = {
            "num_classes": 1 <= self.num_classes <= 2 * appearances,
            "num_contexts": 2 <= self.num_contexts <= self.num_classes // max(1, self.max_objects),
            "bucket_shares": len(self.bucket_shares) == 3 and abs(sum(self.bucket_shares) - 1) < 1e-6,
            "bucket_weights": len(self.bucket_weights) == 3 and all(w > 0 for w in self.bucket_weights),
            "hubs": 0 <= self.hubs < self.num_classes,
            "hub_contexts": 1 <= self.hub_contexts <= self.num_contexts,
            "min_objects": 0 <= self.min_objects <= self.max_objects,
            "scene_length": 1 <= self.scene_length[0] <= self.scene_length[1],
            "move_prob": 0.0 <= self.move_prob <= 1.0,
            "backdrops": self.backdrops >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"TaoProfile.{name} is invalid: got {getattr(self, name)!r}")

    def synth_config(self) -> synth.SynthConfig:
        """The default generator's settings this profile shares (object look and motion)."""
        return synth.SynthConfig(
            num_classes=sprites.max_classes(sprites.SOURCES), num_contexts=1, width=self.width,
            height=self.height, frames_per_video=self.frames_per_video, object_size=self.object_size,
            max_speed=self.max_speed, exemplars=self.exemplars, max_objects=1,
        )  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Who is what: per class its appearance, bucket and contexts; per context its classes."""

    names: list[str]
    appearance: list[int]  # index into the default sources' class bank
    bucket: list[str]  # "f" | "c" | "r"
    contexts: list[list[int]]  # sorted class indices per context
    hubs: list[int]


def layout(p: TaoProfile) -> Layout:
    """Deterministic in ``p.seed``: classes, buckets, look-alike pairs and context groups."""
    base = sprites.available_class_names(sprites.SOURCES)
    if 2 * len(base) < p.num_classes:
        raise ConfigError(
            f"the tao profile needs {p.num_classes} classes but the installed sources give {len(base)} "
            f"appearances ({2 * len(base)} classes at most); install Debian dataset-fashion-mnist and scikit-learn"
        )
    appearance = [k % len(base) for k in range(p.num_classes)]
    names = [f"{base[a]}#{k // len(base) + 1}" for k, a in enumerate(appearance)]
    rng = np.random.default_rng([p.seed, 0x7A0])
    order = rng.permutation(p.num_classes).tolist()
    n_f = round(p.bucket_shares[0] * p.num_classes)
    n_c = round(p.bucket_shares[1] * p.num_classes)
    bucket = ["r"] * p.num_classes
    for i, k in enumerate(order):
        bucket[k] = "f" if i < n_f else "c" if i < n_f + n_c else "r"
    hubs = sorted(order[: p.hubs])  # the first frequent classes
    home = [-1] * p.num_classes
    slot = 0
    for b in BUCKETS:  # each bucket dealt round robin: every context gets its share of the tail
        for k in order:
            if bucket[k] == b and k not in hubs:
                home[k], slot = slot % p.num_contexts, slot + 1
    _separate_lookalikes(home, appearance, bucket, hubs)
    groups = [{k for k in range(p.num_classes) if home[k] == c} for c in range(p.num_contexts)]
    for h in hubs:  # a hub's contexts avoid its look-alike's, where there are enough others
        twin_homes = {home[j] for j in range(p.num_classes) if j != h and appearance[j] == appearance[h]}
        free = [c for c in range(p.num_contexts) if c not in twin_homes]
        pool = free if len(free) >= p.hub_contexts else list(range(p.num_contexts))
        for c in rng.choice(pool, p.hub_contexts, replace=False).tolist():
            groups[c].add(h)
    return Layout(names, appearance, bucket, [sorted(g) for g in groups], hubs)


def _separate_lookalikes(home: list[int], appearance: list[int], bucket: list[str], hubs: list[int]) -> None:
    """Swap homes (within a bucket) until no two classes of one appearance share a context."""
    for k in range(len(home)):
        twins = [j for j in range(len(home)) if j != k and appearance[j] == appearance[k]]
        if k in hubs or not any(home[j] == home[k] for j in twins):
            continue
        for j in range(len(home)):
            if j in hubs or j == k or bucket[j] != bucket[k] or home[j] == home[k]:
                continue
            j_twins = [i for i in range(len(home)) if i != j and appearance[i] == appearance[j]]
            if not any(home[i] == home[j] for i in twins) and not any(home[i] == home[k] for i in j_twins):
                home[k], home[j] = home[j], home[k]
                break


def _weights(p: TaoProfile, lay: Layout, group: Sequence[int]) -> np.ndarray:
    w = np.array([p.bucket_weights[BUCKETS.index(lay.bucket[k])] for k in group])
    return w / w.sum()


def _pick(p: TaoProfile, lay: Layout, ctx: int, present: set[int], rng: np.random.Generator) -> int | None:
    group = lay.contexts[ctx]
    if rng.random() < p.outside_prob:
        outside = [k for k in range(p.num_classes) if k not in group and k not in present]
        if outside:
            return int(rng.choice(outside, p=_weights(p, lay, outside)))
    inside = [k for k in group if k not in present]
    return int(rng.choice(inside, p=_weights(p, lay, inside))) if inside else None


def _bank(p: TaoProfile, lay: Layout) -> sprites.ClassBank:
    base = sprites.build_bank(len(sprites.available_class_names(sprites.SOURCES)), sprites.SOURCES)
    return sprites.ClassBank(
        tuple(lay.names),
        tuple(base.sources[a] for a in lay.appearance),
        tuple(base.exemplars[a] for a in lay.appearance),
    )


def _backdrop(p: TaoProfile, ctx: int, length: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    if p.background:
        footage = backgrounds.load_video_frames(p.background, p.width, p.height)
        stretch = np.array_split(np.arange(len(footage)), p.num_contexts)[ctx]
        return backgrounds.video_clip(footage[stretch] if len(stretch) else footage, length, rng)
    pick = int(rng.integers(p.backdrops))
    canvas = np.random.default_rng([p.seed, synth.BACKGROUND_STREAM, ctx, pick])
    return backgrounds.procedural_clip(p.width, p.height, length, rng, canvas)


def render_video(p: TaoProfile, video_seed: int, lay: Layout | None = None) -> Iterator[SynthFrame]:
    """One video: scenes of its home context, sometimes of another; same seeds, same frames."""
    lay = lay or layout(p)
    bank = _bank(p, lay)
    rng = np.random.default_rng([p.seed, video_seed, 0x7A1])
    side = min(p.width, p.height)
    vmax = p.max_speed * side
    home = int(rng.integers(p.num_contexts))
    t, scene, next_track = 0, 0, 0
    while t < p.frames_per_video:
        length = min(int(rng.integers(p.scene_length[0], p.scene_length[1] + 1)), p.frames_per_video - t)
        ctx = home
        if scene > 0 and rng.random() < p.move_prob:
            ctx = int(rng.choice([c for c in range(p.num_contexts) if c != home]))
        objs: list[sprites.SceneObject] = []

        def spawn(next_track: int, ctx: int = ctx, objs: list = objs) -> int:
            cls = _pick(p, lay, ctx, {o.cls for o in objs}, rng)
            if cls is None:
                return next_track
            size = int(rng.uniform(*p.object_size) * side)
            obj = sprites.make_object(bank, cls, next_track, size, rng, p.exemplars, class_colours=True)
            sprites.place(obj, objs, p.width, p.height, vmax, rng)
            objs.append(obj)
            return next_track + 1

        for _ in range(int(rng.integers(p.min_objects, p.max_objects + 1))):
            next_track = spawn(next_track)
        for i, back in enumerate(_backdrop(p, ctx, length, rng)):
            if i > 0:
                if rng.random() < p.change_prob:
                    if len(objs) < p.max_objects and (len(objs) <= p.min_objects or rng.random() < 0.5):
                        next_track = spawn(next_track)
                    elif len(objs) > p.min_objects:
                        objs.pop(int(rng.integers(len(objs))))
                sprites.step(objs, p.width, p.height, vmax, rng)
            image = back.copy()
            boxes = tuple(ObjectBox(o.track_id, o.cls, sprites.draw(image, o, HALO)) for o in objs)
            yield SynthFrame(image, tuple(sorted({o.cls for o in objs})), boxes, t + i, ctx, scene)
        t += length
        scene += 1


def category_ids(p: TaoProfile) -> list[int]:
    return [CATEGORY_ID_BASE + CATEGORY_ID_STRIDE * k for k in range(p.num_classes)]


def write_dataset(
    out_dir: str | Path, p: TaoProfile, videos: Sequence[int] = TAO_VIDEOS, annotate_every: int = 1,
    *, progress: bool = True,
) -> Path:  # fmt: skip
    """The profile in TAO's layout; categories carry ``frequency``, ``info`` the contexts and scene contexts."""
    counts = synth._check_write_args(videos, annotate_every)
    lay, cids = layout(p), category_ids(p)
    if p.background:
        backgrounds.load_video_frames(p.background, p.width, p.height)  # fail before writing anything
    categories = [
        {"id": c, "name": n, "frequency": b} for c, n, b in zip(cids, lay.names, lay.bucket, strict=True)
    ]
    info = {
        "description": "polymorphd TAO-like benchmark profile (TAO format)",
        "profile": "tao",
        "config": asdict(p),
        "annotate_every": annotate_every,
        "contexts": [[cids[k] for k in g] for g in lay.contexts],
        "hubs": [cids[k] for k in lay.hubs],
    }
    return synth.write_videos(
        Path(out_dir), counts, lambda s: render_video(p, s, lay), categories, info,
        (p.width, p.height, p.frames_per_video), annotate_every, p.seed, progress=progress, scene_context=True,
    )  # fmt: skip


def split_truth(root: str | Path, split: str) -> tuple[list[list[tuple[int, ...]]], list[list[int]]]:
    """Per video, in frame order, each annotated frame's class indices and its scene's true context."""
    import json

    doc = json.loads((Path(root) / "annotations" / f"{split}.json").read_text())
    column = {c["id"]: k for k, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    labels: dict[int, set[int]] = {im["id"]: set() for im in doc["images"]}
    for a in doc["annotations"]:
        labels[a["image_id"]].add(column[a["category_id"]])
    videos: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {}
    for im in doc["images"]:
        entry = (im["frame_index"], im.get("context", -1), tuple(sorted(labels[im["id"]])))
        videos.setdefault(im["video_id"], []).append(entry)
    ordered = [sorted(videos[v]) for v in sorted(videos)]
    return [[e[2] for e in v] for v in ordered], [[e[1] for e in v] for v in ordered]


@dataclass(frozen=True)
class ProfileStats:
    bucket_sizes: dict[str, int]  # classes per bucket
    bucket_frames: dict[str, float]  # median train frames per class of each bucket
    context_sizes: list[int]
    lookalike_pairs: int  # pairs of classes with one appearance
    lookalikes_apart: int  # of them, pairs that share no context
    contexts_per_video: float  # mean distinct scene contexts per video
    labels: synth.LabelStats


def profile_statistics(
    p: TaoProfile, train_labels: Sequence[Sequence[Sequence[int]]], scene_contexts: Sequence[Sequence[int]]
) -> ProfileStats:
    """Buckets, contexts, look-alikes and label statistics; labels are class indices per frame per video."""
    lay = layout(p)
    counts = np.zeros(p.num_classes)
    for video in train_labels:
        for labels in video:
            counts[list(labels)] += 1
    twins: dict[int, list[int]] = {}
    for k, a in enumerate(lay.appearance):
        twins.setdefault(a, []).append(k)
    pairs = [g for g in twins.values() if len(g) == 2]
    apart = sum(not any(a in g and b in g for g in lay.contexts) for a, b in pairs)
    return ProfileStats(
        bucket_sizes={b: lay.bucket.count(b) for b in BUCKETS},
        bucket_frames={
            b: float(np.median(counts[[k for k in range(p.num_classes) if lay.bucket[k] == b]]))
            for b in BUCKETS
            if b in lay.bucket
        },
        context_sizes=[len(g) for g in lay.contexts],
        lookalike_pairs=len(pairs),
        lookalikes_apart=apart,
        contexts_per_video=float(np.mean([len(set(v)) for v in scene_contexts])) if scene_contexts else 0.0,
        labels=synth.label_statistics(train_labels, lay.contexts),
    )


def cli_synth_tao(args: argparse.Namespace) -> int:
    """``polymorphd data synth --profile tao``: write the benchmark and print its statistics."""
    p = TaoProfile(
        num_classes=args.classes if args.classes is not None else TaoProfile.num_classes,
        num_contexts=args.contexts if args.contexts is not None else TaoProfile.num_contexts,
        frames_per_video=args.frames if args.frames is not None else TaoProfile.frames_per_video,
        width=args.size[0] if args.size else TaoProfile.width,
        height=args.size[1] if args.size else TaoProfile.height,
        background=args.background, seed=args.seed,
    )  # fmt: skip
    videos = tuple(args.videos) if args.videos else TAO_VIDEOS
    out = write_dataset(args.out, p, videos, args.annotate_every, progress=True)
    train_labels, scene_contexts = split_truth(out, "train")
    st = profile_statistics(p, train_labels, scene_contexts)
    b, bf = st.bucket_sizes, st.bucket_frames
    print(f"wrote TAO-like benchmark to {out}")
    print(
        f"  classes: {p.num_classes} (frequent {b['f']}, common {b['c']}, rare {b['r']}; median train frames "
        + ", ".join(f"{k} {v:.0f}" for k, v in bf.items())
        + ")"
    )
    print(
        f"  contexts: {len(st.context_sizes)} ({min(st.context_sizes)}-{max(st.context_sizes)} classes each, "
        f"{p.hubs} hub classes in {p.hub_contexts} contexts each)"
    )
    print(
        f"  look-alike pairs: {st.lookalike_pairs} ({st.lookalikes_apart} in different contexts); "
        f"contexts per video {st.contexts_per_video:.2f}"
    )
    lab = st.labels
    print(
        f"  train labels/frame: mean {lab.mean_labels:.2f} (range {lab.min_labels}-{lab.max_labels}); "
        f"persistence {lab.persistence:.3f}; co-occurring pairs within a context {lab.within_context:.1%}"
    )
    return 0
