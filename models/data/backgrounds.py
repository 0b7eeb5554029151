"""Scene backgrounds for the synthetic video generator. Torch-free (numpy + OpenCV).

A background is a sequence of frames that lasts one scene: either a clip of a
real video (played forward, bouncing at the ends) or a procedural canvas
(gradient, low-frequency noise, large blurred shapes) that pans slowly. Both
are darkened so that objects stay the salient thing in the frame.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import cv2
import numpy as np

from polymorphd.models.core.errors import DataError

log = logging.getLogger(__name__)

MAX_VIDEO_FRAMES = 1500  # bounds memory for long background videos (1500 x 128x128x3 = 74 MB)
VIDEO_DIM = 0.7  # real footage is bright and busy; dimming keeps tinted objects readable


# four clips stay decoded: the pretraining corpus cycles through three (a smaller cache thrashed: each
# video decoded its clip again, 10x slower rendering)
@functools.lru_cache(maxsize=4)
def load_video_frames(path: str, width: int, height: int) -> np.ndarray:
    """(N, height, width, 3) uint8 frames of a video, scaled to cover and centre-cropped; decoded once."""
    cap = cv2.VideoCapture(path)
    frames = []
    try:
        if not cap.isOpened():
            raise DataError(f"{path}: cannot open background video (missing, unreadable or not a video file)")
        while len(frames) < MAX_VIDEO_FRAMES:
            ok, img = cap.read()
            if not ok:
                break
            h, w = img.shape[:2]
            s = max(width / w, height / h)
            nw, nh = max(width, round(w * s)), max(height, round(h * s))
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            y0, x0 = (nh - height) // 2, (nw - width) // 2
            frames.append(img[y0 : y0 + height, x0 : x0 + width])
    finally:
        cap.release()
    if not frames:
        raise DataError(f"{path}: background video has no decodable frames")
    arr = (np.stack(frames).astype(np.float32) * VIDEO_DIM).astype(np.uint8)
    arr.setflags(write=False)
    log.info("background video %s: %d frames at %dx%d", path, len(arr), width, height)
    return arr


def video_clip(frames: np.ndarray, length: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``length`` consecutive frames from a random start, bouncing at the ends of the video."""
    n = len(frames)
    start = int(rng.integers(n))
    step = 1 if rng.random() < 0.5 else -1
    period = max(1, 2 * (n - 1))
    for t in range(length):
        k = (start + step * t) % period if n > 1 else 0
        yield frames[k if k < n else period - k]


def _procedural_canvas(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A dark-to-mid-tone float32 canvas: gradient + low-frequency noise + large soft shapes."""
    c0, c1 = rng.uniform(15, 110, 3), rng.uniform(30, 150, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (np.cos(ang) * xx + np.sin(ang) * yy) / max(height, width)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    noise = rng.normal(0, 18, (6, 6, 3)).astype(np.float32)
    img += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    # Shapes are big (over half the frame) and blurred so that none passes for a glyph object.
    layer = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), np.float32)
    big = max(height, width)
    for _ in range(int(rng.integers(2, 6))):
        colour = rng.uniform(10, 140, 3).tolist()
        kind = rng.integers(3)
        p = (int(rng.integers(width)), int(rng.integers(height)))
        if kind == 0:
            q = (p[0] + int(rng.uniform(0.5, 1.0) * big), p[1] + int(rng.uniform(0.5, 1.0) * big))
            cv2.rectangle(layer, p, q, colour, -1)
            cv2.rectangle(mask, p, q, 1.0, -1)
        elif kind == 1:
            r = int(rng.uniform(0.3, 0.6) * big)
            cv2.circle(layer, p, r, colour, -1)
            cv2.circle(mask, p, r, 1.0, -1)
        else:
            q = (int(rng.integers(width)), int(rng.integers(height)))
            th = int(rng.uniform(0.05, 0.15) * big)
            cv2.line(layer, p, q, colour, th)
            cv2.line(mask, p, q, 1.0, th)
    k = 2 * (big // 24) + 1
    layer, mask = cv2.GaussianBlur(layer, (k, k), 0), cv2.GaussianBlur(mask, (k, k), 0)[..., None]
    alpha = mask * rng.uniform(0.3, 0.6)
    img = img * (1 - alpha) + layer * alpha
    return np.clip(img, 0, 255).astype(np.uint8)


def procedural_clip(
    width: int,
    height: int,
    length: int,
    rng: np.random.Generator,
    canvas_rng: np.random.Generator | None = None,
) -> Iterator[np.ndarray]:
    """``length`` frames panning slowly in a straight line across one procedural canvas.

    ``canvas_rng`` draws the canvas (default ``rng``): seeding it from a small pool makes canvases recur.
    """
    margin = max(8, max(width, height) // 3)
    canvas = _procedural_canvas(height + margin, width + margin, canvas_rng or rng)
    travel = min(margin, rng.uniform(0.3, 1.0) * 0.6 * length)  # at most ~0.6 px per frame
    ang = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(ang), np.sin(ang)]) * travel
    start = rng.uniform(np.maximum(0, -d), np.minimum(margin, margin - d))
    for t in range(length):
        x, y = np.round(start + d * (t / max(1, length - 1))).astype(int).tolist()
        yield canvas[y : y + height, x : x + width]
