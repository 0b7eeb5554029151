from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.data import tao

# Sparse LVIS-like category ids; images deliberately out of order; frame 20 of video 7 annotated with nothing.
CATS = [{"id": 805, "name": "person"}, {"id": 3, "name": "bicycle"}, {"id": 1201, "name": "dog"}]
SPEC: dict[str, Any] = {
    "videos": [{"id": 7, "name": "train/YFCC/v_a"}, {"id": 2, "name": "train/YFCC/v_b"}],
    "images": [
        {"id": 4711, "video_id": 7, "frame_index": 20, "file_name": "train/YFCC/v_a/frame0020.jpg"},
        {"id": 12, "video_id": 2, "frame_index": 0, "file_name": "train/YFCC/v_b/frame0000.jpg"},
        {"id": 11, "video_id": 7, "frame_index": 0, "file_name": "train/YFCC/v_a/frame0000.jpg"},
        {"id": 99, "video_id": 7, "frame_index": 10, "file_name": "train/YFCC/v_a/frame0010.jpg"},
    ],
    "annotations": [
        {"id": 1, "image_id": 11, "category_id": 805, "bbox": [0, 0, 4, 4], "track_id": 1},
        {"id": 2, "image_id": 11, "category_id": 3, "bbox": [1, 1, 4, 4], "track_id": 2},
        {"id": 3, "image_id": 99, "category_id": 805, "bbox": [0, 0, 4, 4], "track_id": 1},
        {"id": 4, "image_id": 12, "category_id": 1201, "bbox": [0, 0, 4, 4], "track_id": 3},
        {"id": 5, "image_id": 12, "category_id": 1201, "bbox": [2, 2, 4, 4], "track_id": 4},
    ],
    "tracks": [{"id": 1, "category_id": 805, "video_id": 7}],
    "categories": CATS,
    "info": {"anything": "ignored"},
}


def write_dataset(root: Path, spec: dict[str, Any], split: str = "train", frames: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{split}.json").write_text(json.dumps(spec))
    if frames:
        for im in spec["images"]:
            p = root / "frames" / im["file_name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), np.full((6, 8, 3), im["frame_index"], np.uint8))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds", SPEC)


def test_load_orders_frames_and_collects_label_sets(root: Path) -> None:
    split = tao.load_split(root, "train")
    assert [c.id for c in split.categories] == [3, 805, 1201]
    assert [v.id for v in split.videos] == [2, 7]
    frames = split.frames()
    assert [(f.video_id, f.frame_index, f.image_id) for f in frames] == [
        (2, 0, 12),
        (7, 0, 11),
        (7, 10, 99),
        (7, 20, 4711),
    ]
    assert [f.labels for f in frames] == [
        frozenset({1201}),
        frozenset({3, 805}),
        frozenset({805}),
        frozenset(),
    ]
    assert frames[1].path == root / "frames" / "train/YFCC/v_a/frame0000.jpg"


def test_counts_are_annotations_per_frame_and_no_audio_without_the_field(root: Path) -> None:
    split = tao.load_split(root, "train")
    # image 12 has two dogs (one label, two objects); frame 20 of video 7 none
    assert [f.count for f in split.frames()] == [2, 2, 1, 0]
    assert all(v.audio is None for v in split.videos) and split.audio_tracks() == {}


def test_multi_hot_uses_the_given_class_order(root: Path) -> None:
    split = tao.load_split(root, "train")
    y = split.multi_hot(split.frames(), [1201, 805, 3])
    assert y.dtype == np.uint8
    assert y.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(DataError, match=r"category id 3 is not in the given class list of 2 ids"):
        split.multi_hot(split.frames(), [1201, 805])
    assert split.multi_hot(split.frames(), [805], ignore_unknown=True)[:, 0].tolist() == [0, 1, 1, 0]
    with pytest.raises(DataError, match="appears twice"):
        split.multi_hot(split.frames(), [805, 805])


def test_available_splits_and_missing_split(root: Path) -> None:
    write_dataset(root, {**SPEC}, split="test", frames=False)
    write_dataset(root, {**SPEC}, split="extra", frames=False)
    assert tao.available_splits(root) == ["train", "test", "extra"]
    assert tao.available_splits(root / "nowhere") == []
    with pytest.raises(
        DataError,
        match=r"validation\.json: split 'validation' not found \(splits found: train, test, extra\)",
    ):
        tao.load_split(root, "validation")
    with pytest.raises(DataError, match="no split files in"):
        tao.load_split(root / "nowhere", "train")


def test_evaluation_split_prefers_test_and_says_why(root: Path) -> None:
    with pytest.raises(DataError, match=r"no test or validation split to evaluate \(splits found: train\)"):
        tao.evaluation_split(root)
    write_dataset(root, {**SPEC}, split="validation", frames=False)
    assert tao.evaluation_split(root) == (
        "validation",
        "no test split: the calibration split, which is not a test",
    )
    write_dataset(root, {**SPEC}, split="test", frames=False)
    assert tao.evaluation_split(root) == ("test", "the dataset's test split")
    assert tao.evaluation_split(root, "validation") == (
        "validation",
        "as asked (the calibration split: not a test)",
    )
    assert tao.evaluation_split(root, "train") == ("train", "as asked")


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """A copy of SPEC with one entry changed: path like 'images.1.video_id' (value DEL deletes)."""
    spec = copy.deepcopy(SPEC)
    *parents, last = path.split(".")
    node: Any = spec
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    key: Any = int(last) if last.isdigit() else last
    if value == "DEL":
        del node[key]
    else:
        node[key] = value
    return spec


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("images.1.video_id", "DEL", r"images\[1\] \(id 12\): missing key\(s\) 'video_id'"),
        ("images.2.video_id", 55, r"images\[2\] \(id 11\): unknown video_id 55 \(not in 'videos'\)"),
        ("images.3.id", 12, r"images\[3\] \(id 12\): duplicate image id 12"),
        ("images.0.frame_index", "20", r"images\[0\] \(id 4711\): 'frame_index' must be int, got '20'"),
        ("images.0.frame_index", 0, r"images\[2\] \(id 11\): frame_index 0 of video 7 is already image 4711"),
        ("images.0.frame_index", -1, r"images\[0\] \(id 4711\): frame_index must be >= 0"),
        ("images.0", [1, 2], r"images\[0\]: expected an object, got list"),
        ("annotations.2.image_id", 404, r"annotations\[2\] \(id 3\): unknown image_id 404"),
        (
            "annotations.0.category_id",
            9,
            r"annotations\[0\] \(id 1\): unknown category_id 9 \(not in 'categories'\)",
        ),
        ("annotations.4.category_id", "DEL", r"annotations\[4\] \(id 5\): missing key\(s\) 'category_id'"),
        ("categories.2.id", 3, r"categories\[2\] \(id 3\): duplicate category id 3"),
        ("categories.0.name", "DEL", r"categories\[0\] \(id 805\): missing key\(s\) 'name'"),
        ("videos.1.id", 7, r"videos\[1\] \(id 7\): duplicate video id 7"),
        ("images", {"a": 1}, r"images: expected a list, got dict"),
        ("annotations", "DEL", r"top level: missing key\(s\) 'annotations'"),
    ],
)
def test_malformed_split_names_file_entry_and_problem(
    tmp_path: Path, path: str, value: Any, expected: str
) -> None:
    root = write_dataset(tmp_path / "ds", SPEC)
    (root / "annotations" / "train.json").write_text(json.dumps(_mutate(path, value)))
    with pytest.raises(DataError, match=r"train\.json: " + expected):
        tao.load_split(root, "train")


def test_invalid_json_and_wrong_top_level(root: Path) -> None:
    f = root / "annotations" / "train.json"
    f.write_text('{"videos": [}')
    with pytest.raises(DataError, match=r"train\.json: invalid JSON at line 1 column 13"):
        tao.load_split(root, "train")
    f.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"train\.json: top level must be a JSON object, got list"):
        tao.load_split(root, "train")


def test_missing_frame_file_is_checked_unless_disabled(root: Path) -> None:
    (root / "frames" / "train/YFCC/v_a/frame0010.jpg").unlink()
    with pytest.raises(DataError, match=r"images\[3\] \(id 99\): frame file .*frame0010\.jpg does not exist"):
        tao.load_split(root, "train")
    assert len(tao.load_split(root, "train", check_files=False).frames()) == 4


def test_include_unannotated_lists_whole_videos(root: Path) -> None:
    # TAO annotates ~1 frame in 30: the other frame files exist but are not in `images`.
    for i in range(21):
        p = root / "frames" / f"train/YFCC/v_a/frame{i:04d}.jpg"
        if not p.exists():
            cv2.imwrite(str(p), np.zeros((6, 8, 3), np.uint8))
    (root / "frames" / "train/YFCC/v_a/notes.txt").write_text("not a frame")
    split = tao.load_split(root, "train", include_unannotated=True)
    v7 = next(v for v in split.videos if v.id == 7)
    assert [f.frame_index for f in v7.frames] == list(range(21))
    assert [f.labels is not None for f in v7.frames] == [i in (0, 10, 20) for i in range(21)]
    assert v7.frames[5].image_id is None and v7.frames[5].path.name == "frame0005.jpg"
    assert len(split.annotated_frames()) == 4
    with pytest.raises(DataError, match="is not annotated"):
        split.multi_hot(split.frames(), split.category_ids())


def test_include_unannotated_uses_name_numbers_when_frames_are_missing(tmp_path: Path) -> None:
    # A clip that starts at frame 5: positions disagree with frame_index, the number in the name does not.
    spec = {
        "videos": [{"id": 1, "name": "v"}],
        "images": [{"id": 1, "video_id": 1, "frame_index": 6, "file_name": "v/img_0007.png"}],
        "annotations": [],
        "categories": [],
    }
    root = write_dataset(tmp_path / "ds", spec)
    for n in (6, 8, 9):
        cv2.imwrite(str(root / "frames" / f"v/img_{n:04d}.png"), np.zeros((4, 4, 3), np.uint8))
    split = tao.load_split(root, "train", include_unannotated=True)
    assert [(f.frame_index, f.labels) for f in split.frames()] == [
        (5, None),
        (6, frozenset()),
        (7, None),
        (8, None),
    ]
    cv2.imwrite(str(root / "frames" / "v/img_x.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"video 1: cannot infer frame indices of unannotated files"):
        tao.load_split(root, "train", include_unannotated=True)
    (root / "frames" / "v").rename(root / "frames" / "elsewhere")
    with pytest.raises(DataError, match=r"frame folder .*frames/v does not exist"):
        tao.load_split(root, "train", include_unannotated=True, check_files=False)


def _many_videos(tmp_path: Path, n: int) -> tao.TaoSplit:
    spec = {
        "videos": [{"id": 100 + v, "name": f"v{v}"} for v in range(n)],
        "images": [
            {"id": 10 * v + i, "video_id": 100 + v, "frame_index": i, "file_name": f"v{v}/{i}.jpg"}
            for v in range(n)
            for i in range(3)
        ],
        "annotations": [],
        "categories": CATS,
    }
    return tao.load_split(write_dataset(tmp_path / "many", spec, frames=False), "train", check_files=False)


def test_split_by_video_never_splits_a_video(tmp_path: Path) -> None:
    split = _many_videos(tmp_path, 10)
    rest, held = tao.split_by_video(split, 0.3, seed=1)
    assert len(held.videos) == 3 and len(rest.videos) == 7
    assert {v.id for v in rest.videos}.isdisjoint({v.id for v in held.videos})
    assert sorted(v.id for v in rest.videos + held.videos) == [v.id for v in split.videos]
    for part in (rest, held):
        for v in part.videos:
            assert {f.video_id for f in v.frames} == {v.id} and len(v.frames) == 3
    assert held.categories == split.categories and rest.name == "train" and held.name == "train-heldout"
    assert tao.split_by_video(split, 0.3, seed=1) == (rest, held)
    assert tao.split_by_video(split, 0.3, seed=2) != (rest, held)
    assert len(tao.split_by_video(split, 0.01, seed=0)[1].videos) == 1  # never empty
    assert len(tao.split_by_video(split, 0.99, seed=0)[0].videos) == 1
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\), got 1.5"):
        tao.split_by_video(split, 1.5, seed=0)
    with pytest.raises(DataError, match="has 1 video"):
        tao.split_by_video(_many_videos(tmp_path / "one", 1), 0.5, seed=0)


def test_load_images_resizes_bgr_and_names_bad_files(root: Path) -> None:
    split = tao.load_split(root, "train")
    red = root / "frames" / "train/YFCC/v_b/frame0000.jpg"
    img = np.zeros((6, 8, 3), np.uint8)
    img[..., 2] = 255
    cv2.imwrite(str(red), img)
    arr = tao.load_images(split.frames(), 4)
    assert arr.shape == (4, 4, 4, 3) and arr.dtype == np.uint8
    assert arr[0, ..., 2].min() > 240 and arr[0, ..., 0].max() < 15  # BGR, as cv2 reads it
    assert abs(int(arr[2].mean()) - 10) <= 2  # frame 10 was written with value 10
    red.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"frame0000\.jpg: cannot decode image \(video 2, frame 0\)"):
        tao.load_images(split.frames(), 4)
    red.unlink()
    with pytest.raises(DataError, match=r"frame0000\.jpg: frame file does not exist"):
        tao.load_images(split.frames(), 4)
    with pytest.raises(ConfigError, match="image size must be >= 1, got 0"):
        tao.load_images(split.frames(), 0)
