"""TAO-format multi-label video dataset loader. Torch-free (numpy + OpenCV).

TAO (Dave et al., ECCV 2020) is the Polymorph paper's dataset. Layout:
``DIR/annotations/<split>.json`` and frames under ``DIR/frames/``, each image's
``file_name`` relative to ``DIR/frames/``. Category ids are arbitrary (LVIS ids),
``images`` is unordered, annotated frames may be sparse (about one per second),
and a frame's labels are the set of category ids of its annotations.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.data.audio import AudioTrack

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")  # TAO's split names, in this order
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_TRAILING_INT = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class Frame:
    image_id: int | None  # None: a frame file that is not in `images` (not annotated)
    video_id: int
    frame_index: int
    path: Path
    labels: frozenset[int] | None  # category ids; None = not annotated
    count: int | None = None  # annotations (object instances) in the frame; None = not annotated


@dataclass(frozen=True)
class Video:
    id: int
    name: str
    frames: tuple[Frame, ...]  # ordered by frame_index
    audio: AudioTrack | None = None  # the video's optional "audio" entry (models/data/audio.py)


@dataclass(frozen=True)
class TaoSplit:
    name: str
    root: Path
    categories: tuple[Category, ...]
    videos: tuple[Video, ...]

    def frames(self) -> list[Frame]:
        """All frames, video by video, in frame order."""
        return [f for v in self.videos for f in v.frames]

    def annotated_frames(self) -> list[Frame]:
        """Frames with labels (``labels is not None``), video by video, in frame order."""
        return [f for v in self.videos for f in v.frames if f.labels is not None]

    def category_ids(self) -> list[int]:
        return [c.id for c in self.categories]

    def audio_tracks(self) -> dict[int, AudioTrack]:
        """Video id -> its audio track, for the videos that have one."""
        return {v.id: v.audio for v in self.videos if v.audio is not None}

    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def multi_hot(
        self, frames: Sequence[Frame], category_ids: Sequence[int], *, ignore_unknown: bool = False
    ) -> np.ndarray:
        """(F, K) uint8 targets, column k for ``category_ids[k]``.

        A label outside ``category_ids`` is an error unless ``ignore_unknown``;
        an unannotated frame (``labels is None``) is always an error.
        """
        column: dict[int, int] = {}
        for k, cid in enumerate(category_ids):
            if cid in column:
                raise DataError(
                    f"category id {cid} appears twice in the class list (positions {column[cid]} and {k})"
                )
            column[int(cid)] = k
        out = np.zeros((len(frames), len(column)), dtype=np.uint8)
        for i, frame in enumerate(frames):
            if frame.labels is None:
                raise DataError(
                    f"{frame.path}: frame {frame.frame_index} of video {frame.video_id} is not annotated; "
                    "pass only frames whose labels are not None (TaoSplit.annotated_frames())"
                )
            for cid in frame.labels:
                k = column.get(cid)
                if k is not None:
                    out[i, k] = 1
                elif not ignore_unknown:
                    raise DataError(
                        f"{frame.path}: category id {cid} is not in the given class list of {len(column)} ids; "
                        "pass ignore_unknown=True to drop it"
                    )
        return out


def available_splits(root: str | Path) -> list[str]:
    """Split names with an ``annotations/<split>.json`` file: TAO's three first, others sorted."""
    ann = Path(root) / "annotations"
    if not ann.is_dir():
        return []
    names = {p.stem for p in ann.glob("*.json") if p.is_file()}
    return [s for s in SPLITS if s in names] + sorted(names - set(SPLITS))


def evaluation_split(root: str | Path, asked: str | None = None) -> tuple[str, str]:
    """The split eval and bench score, and why: ``asked`` if given, else ``test``, else the calibration split.

    ``train --data`` calibrates on ``validation``, so scoring it measures what was tuned on: the reason
    says so, and eval/bench print it beside every result.
    """
    if asked:
        return asked, "as asked" + (" (the calibration split: not a test)" if asked == "validation" else "")
    found = available_splits(root)
    if "test" in found:
        return "test", "the dataset's test split"
    if "validation" in found:
        return "validation", "no test split: the calibration split, which is not a test"
    raise DataError(
        f"{root} has no test or validation split to evaluate (splits found: {', '.join(found) or 'none'}); "
        "give one with --split"
    )


class _Checker:
    """Builds DataError messages that name the file, the entry and the problem."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, entry: str, problem: str) -> DataError:
        return DataError(f"{self.path}: {entry}: {problem}")

    def entries(self, data: dict[str, Any], key: str) -> list[Any]:
        value = data[key]
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        return value

    def entry(self, obj: Any, key: str, i: int, required: dict[str, type]) -> str:
        """Check one entry's required keys and types; return its name for messages."""
        name = f"{key}[{i}]"
        if not isinstance(obj, dict):
            raise self.fail(name, f"expected an object, got {type(obj).__name__}")
        if isinstance(obj.get("id"), int):
            name = f"{name} (id {obj['id']})"
        missing = [k for k in required if k not in obj]
        if missing:
            raise self.fail(name, f"missing key(s) {', '.join(repr(k) for k in missing)}")
        for k, typ in required.items():
            v = obj[k]
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise self.fail(name, f"{k!r} must be {typ.__name__}, got {v!r}")
        return name


def _read_json(path: Path, root: Path, split: str) -> dict[str, Any]:
    if not path.is_file():
        found = available_splits(root)
        hint = f"splits found: {', '.join(found)}" if found else f"no split files in {root / 'annotations'}"
        raise DataError(f"{path}: split {split!r} not found ({hint})")
    try:
        with path.open("rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read split file: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in ("videos", "images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"{path}: top level: missing key(s) {', '.join(repr(k) for k in missing)}")
    return data


def load_split(
    root: str | Path, split: str, *, include_unannotated: bool = False, check_files: bool = True
) -> TaoSplit:
    """Load and validate one split of a TAO-format dataset directory.

    ``include_unannotated`` also lists frame files in ``DIR/frames/<video name>/``
    that are not in ``images`` (labels None), so whole videos can be streamed.
    ``check_files`` verifies every annotated frame file exists.
    """
    root = Path(root)
    path = root / "annotations" / f"{split}.json"
    data = _read_json(path, root, split)
    chk = _Checker(path)
    frames_dir = root / "frames"

    categories: dict[int, Category] = {}
    for i, c in enumerate(chk.entries(data, "categories")):
        name = chk.entry(c, "categories", i, {"id": int, "name": str})
        if c["id"] in categories:
            raise chk.fail(name, f"duplicate category id {c['id']}")
        categories[c["id"]] = Category(c["id"], c["name"])

    videos: dict[int, str] = {}
    audio: dict[int, AudioTrack] = {}
    for i, v in enumerate(chk.entries(data, "videos")):
        name = chk.entry(v, "videos", i, {"id": int, "name": str})
        if v["id"] in videos:
            raise chk.fail(name, f"duplicate video id {v['id']}")
        videos[v["id"]] = v["name"]
        if "audio" in v:
            audio[v["id"]] = _audio_track(chk, name, v, frames_dir, check_files)

    images: dict[int, tuple[int, int, Path]] = {}  # id -> (video_id, frame_index, path)
    slots: dict[tuple[int, int], int] = {}  # (video_id, frame_index) -> image id
    for i, im in enumerate(chk.entries(data, "images")):
        name = chk.entry(im, "images", i, {"id": int, "video_id": int, "frame_index": int, "file_name": str})
        iid, vid, fidx = im["id"], im["video_id"], im["frame_index"]
        if iid in images:
            raise chk.fail(name, f"duplicate image id {iid}")
        if vid not in videos:
            raise chk.fail(name, f"unknown video_id {vid} (not in 'videos')")
        if fidx < 0:
            raise chk.fail(name, f"frame_index must be >= 0, got {fidx}")
        if (vid, fidx) in slots:
            raise chk.fail(name, f"frame_index {fidx} of video {vid} is already image {slots[vid, fidx]}")
        if Path(im["file_name"]).is_absolute():
            raise chk.fail(name, f"file_name {im['file_name']!r} must be relative to {frames_dir}")
        fpath = frames_dir / im["file_name"]
        if check_files and not fpath.is_file():
            raise chk.fail(name, f"frame file {fpath} does not exist")
        images[iid] = (vid, fidx, fpath)
        slots[vid, fidx] = iid

    labels: dict[int, set[int]] = {iid: set() for iid in images}
    counts: dict[int, int] = dict.fromkeys(images, 0)
    for i, a in enumerate(chk.entries(data, "annotations")):
        name = chk.entry(a, "annotations", i, {"image_id": int, "category_id": int})
        if a["image_id"] not in images:
            raise chk.fail(name, f"unknown image_id {a['image_id']} (not in 'images')")
        if a["category_id"] not in categories:
            raise chk.fail(name, f"unknown category_id {a['category_id']} (not in 'categories')")
        labels[a["image_id"]].add(a["category_id"])
        counts[a["image_id"]] += 1

    per_video: dict[int, list[Frame]] = {vid: [] for vid in videos}
    for iid, (vid, fidx, fpath) in images.items():
        per_video[vid].append(Frame(iid, vid, fidx, fpath, frozenset(labels[iid]), counts[iid]))
    if include_unannotated:
        for vid, vname in videos.items():
            per_video[vid] = _with_unannotated(path, frames_dir / vname, vid, per_video[vid])

    out_videos = []
    for vid in sorted(videos):
        frames = sorted(per_video[vid], key=lambda f: f.frame_index)
        if frames:
            out_videos.append(Video(vid, videos[vid], tuple(frames), audio.get(vid)))
        else:
            log.debug("%s: video %d (%s) has no frames; skipped", path, vid, videos[vid])
    result = TaoSplit(split, root, tuple(categories[c] for c in sorted(categories)), tuple(out_videos))
    log.info(
        "loaded %s: %d videos, %d frames (%d annotated), %d categories",
        path, len(result.videos), sum(len(v.frames) for v in result.videos),
        len(images), len(result.categories),
    )  # fmt: skip
    return result


def _audio_track(
    chk: _Checker, name: str, v: dict[str, Any], frames_dir: Path, check_files: bool
) -> AudioTrack:
    """A video entry's optional ``"audio": {"file_name", "sample_rate"}`` with its ``"fps"``, validated."""
    entry = v["audio"]
    if not isinstance(entry, dict):
        raise chk.fail(name, f"'audio' must be an object {{file_name, sample_rate}}, got {entry!r}")
    chk.entry(entry, f"{name}.audio", 0, {"file_name": str, "sample_rate": int})
    fps = v.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise chk.fail(
            name, f"a video with 'audio' needs 'fps' > 0 (ties frames to the audio clock), got {fps!r}"
        )
    if entry["sample_rate"] < 1:
        raise chk.fail(name, f"audio sample_rate must be >= 1, got {entry['sample_rate']}")
    if Path(entry["file_name"]).is_absolute():
        raise chk.fail(name, f"audio file_name {entry['file_name']!r} must be relative to {frames_dir}")
    path = frames_dir / entry["file_name"]
    if check_files and not path.is_file():
        raise chk.fail(name, f"audio file {path} does not exist")
    return AudioTrack(path, entry["sample_rate"], float(fps))


def _natural_key(p: Path) -> tuple[int, int, str]:
    m = _TRAILING_INT.search(p.stem)
    return (0, int(m.group(1)), p.name) if m else (1, 0, p.name)


def _with_unannotated(split_file: Path, folder: Path, vid: int, annotated: list[Frame]) -> list[Frame]:
    """Add the folder's frame files that are not annotated, inferring their frame_index.

    TAO's frame_index is the frame's position among all frames of the video, so
    the position in name order is used when it agrees with every annotated frame
    in the folder; otherwise a constant offset between the number in the file
    name and frame_index.
    """
    if not folder.is_dir():
        raise DataError(
            f"{split_file}: video {vid}: frame folder {folder} does not exist; "
            "include_unannotated needs each video's frames under DIR/frames/<video name>/"
        )
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    resolved = [p.resolve() for p in files]
    known = {f.path.resolve(): f for f in annotated}
    in_folder = [(i, known[r]) for i, r in enumerate(resolved) if r in known]
    if all(i == f.frame_index for i, f in in_folder):
        index = list(range(len(files)))
    else:
        numbers = [_TRAILING_INT.search(p.stem) for p in files]
        offsets = {f.frame_index - int(m.group(1)) for i, f in in_folder if (m := numbers[i]) is not None}
        if len(offsets) != 1 or any(m is None for m in numbers):
            raise DataError(
                f"{split_file}: video {vid}: cannot infer frame indices of unannotated files in {folder}: "
                "neither their order nor the numbers in their names match the annotated frame_index values"
            )
        offset = offsets.pop()
        index = [int(m.group(1)) + offset for m in numbers if m is not None]
    taken = {f.frame_index: f for f in annotated}
    out = list(annotated)
    for p, r, fidx in zip(files, resolved, index, strict=True):
        if r in known:
            continue
        if fidx in taken:
            raise DataError(
                f"{split_file}: video {vid}: file {p} would be frame {fidx}, which is annotated as {taken[fidx].path}"
            )
        out.append(Frame(None, vid, fidx, p, None))
    return out


def split_by_video(split: TaoSplit, fraction: float, seed: int) -> tuple[TaoSplit, TaoSplit]:
    """Split into (rest, held-out) by whole videos; held-out has about ``fraction`` of them."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"split fraction must be in (0, 1), got {fraction}")
    n = len(split.videos)
    if n < 2:
        raise DataError(f"split {split.name!r} has {n} video(s); splitting by video needs at least 2")
    held = min(n - 1, max(1, round(fraction * n)))
    chosen = set(np.random.default_rng(seed).permutation(n)[:held].tolist())
    rest_v = tuple(v for i, v in enumerate(split.videos) if i not in chosen)
    held_v = tuple(v for i, v in enumerate(split.videos) if i in chosen)
    return replace(split, videos=rest_v), replace(split, name=f"{split.name}-heldout", videos=held_v)


def load_images(frames: Sequence[Frame], size: int, *, progress: bool = False) -> np.ndarray:
    """Read frames into a (F, size, size, 3) uint8 BGR array (cv2.imread, INTER_AREA resize)."""
    if size < 1:
        raise ConfigError(f"image size must be >= 1, got {size}")
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    items: Any = frames
    if progress:
        from tqdm import tqdm

        items = tqdm(frames, desc="loading frames", unit="frame")
    for i, f in enumerate(items):
        where = f"video {f.video_id}, frame {f.frame_index}"
        if not f.path.is_file():
            raise DataError(f"{f.path}: frame file does not exist ({where})")
        img = cv2.imread(str(f.path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{f.path}: cannot decode image ({where}); the file is corrupt or not an image")
        out[i] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return out
