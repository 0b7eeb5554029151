from __future__ import annotations

import cv2
import numpy as np
import pytest

from polymorphd.models.core.preprocess import InputSpec, preprocess, preprocess_batch, resize_to

SPEC = InputSpec(size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference(frame_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    rgb = frame_bgr[..., ::-1].astype(np.float64) / 255.0
    x = (rgb - np.array(spec.mean)) / np.array(spec.std)
    return x.transpose(2, 0, 1)[None]


def test_normalises_to_rgb_nchw() -> None:
    frame = _frame(16, 16)
    x = preprocess(frame, SPEC)
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x, _reference(frame, SPEC), atol=1e-5)
    # channel 0 is red: a pure-red BGR frame is high in channel 0 only
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 2] = 255
    x = preprocess(red, SPEC)
    assert x[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    assert x[0, 1, 0, 0] == pytest.approx(-0.456 / 0.224, rel=1e-6)


def test_writes_into_the_given_buffer() -> None:
    out = np.full((1, 3, 16, 16), np.nan, dtype=np.float32)
    x = preprocess(_frame(16, 16), SPEC, out=out)
    assert x is out and np.isfinite(out).all()
    preprocess(_frame(16, 16, seed=1), SPEC, out=out)
    np.testing.assert_allclose(out, _reference(_frame(16, 16, seed=1), SPEC), atol=1e-5)


def test_resizes_with_area_when_shrinking_and_linear_when_enlarging() -> None:
    big = _frame(48, 64)
    np.testing.assert_array_equal(resize_to(big, 16), cv2.resize(big, (16, 16), interpolation=cv2.INTER_AREA))
    small = _frame(8, 8)
    np.testing.assert_array_equal(
        resize_to(small, 16), cv2.resize(small, (16, 16), interpolation=cv2.INTER_LINEAR)
    )
    np.testing.assert_allclose(preprocess(big, SPEC), _reference(resize_to(big, 16), SPEC), atol=1e-5)


def test_accepts_grayscale_and_views() -> None:
    gray = _frame(20, 20)[..., 0]
    as_bgr = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_array_equal(preprocess(gray, SPEC), preprocess(as_bgr, SPEC))
    np.testing.assert_array_equal(preprocess(gray[..., None], SPEC), preprocess(as_bgr, SPEC))
    flipped = _frame(16, 16)[::-1, ::2]  # negative and doubled strides
    np.testing.assert_array_equal(preprocess(flipped, SPEC), preprocess(flipped.copy(), SPEC))


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (np.zeros((16, 16, 4), np.uint8), r"\(16, 16, 4\)"),
        (np.zeros((16, 16, 3), np.float32), "dtype float32"),
        (np.zeros((2, 16, 16, 3), np.uint8), r"\(2, 16, 16, 3\)"),
        (np.zeros((0, 16, 3), np.uint8), r"\(0, 16, 3\)"),
        ([[1, 2]], "numpy array"),
    ],
)
def test_rejects_frames_that_are_not_hxwx3_uint8(frame: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preprocess(frame, SPEC)


def test_rejects_a_wrong_buffer() -> None:
    with pytest.raises(ValueError, match=r"float32 \(1, 3, 16, 16\)"):
        preprocess(_frame(16, 16), SPEC, out=np.empty((1, 3, 16, 16), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        preprocess(_frame(16, 16), SPEC, out=np.empty((1, 3, 16, 32), np.float32)[..., ::2])


def test_training_and_runtime_tensors_are_identical() -> None:
    frames = np.stack([_frame(16, 16, seed=s) for s in range(5)])
    batch = preprocess_batch(frames, SPEC)
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == np.float32
    buf = np.empty((1, 3, 16, 16), np.float32)
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(preprocess(frame, SPEC, out=buf)[0], batch[i])
    # frames of another size are resized exactly as at run time
    big = np.stack([_frame(40, 30, seed=s) for s in range(2)])
    batch = preprocess_batch(big, SPEC)
    for i, frame in enumerate(big):
        np.testing.assert_array_equal(preprocess(frame, SPEC)[0], batch[i])


def test_batch_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        preprocess_batch(_frame(16, 16), SPEC)


def test_spec_round_trips_and_validates() -> None:
    d = SPEC.to_dict()
    assert d == {
        "size": 16,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "layout": "NCHW",
        "color": "RGB",
    }
    assert InputSpec.from_dict(d) == SPEC
    assert InputSpec.from_dict({"size": 16, "mean": d["mean"], "std": d["std"]}) == SPEC
    with pytest.raises(ValueError, match=r"lacks \['std'\]"):
        InputSpec.from_dict({"size": 16, "mean": [0, 0, 0]})
    with pytest.raises(ValueError, match=r"unknown keys \['scale'\]"):
        InputSpec.from_dict({**d, "scale": 1})
    with pytest.raises(ValueError, match="positive integer"):
        InputSpec(size=0)
    with pytest.raises(ValueError, match="std must be > 0"):
        InputSpec(size=8, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 finite numbers"):
        InputSpec(size=8, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="layout 'NHWC'"):
        InputSpec(size=8, layout="NHWC")  # type: ignore[arg-type]
