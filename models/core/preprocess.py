"""Frame preprocessing shared by training, eval and the daemon (torch-free).

BGR uint8 frame of any size -> (1, 3, S, S) float32 RGB, normalised as (x / 255 - mean) / std. Training and
runtime call the same code, so a frame gives bit-identical tensors in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

__all__ = ["InputSpec", "preprocess", "preprocess_batch", "resize_to"]


@dataclass(frozen=True)
class InputSpec:
    """The model input, as the bundle manifest's `input` object. mean/std are in 0..1 pixel units, RGB order."""

    size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, what ViT checkpoints expect
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"input size must be a positive integer, got {self.size!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not all(np.isfinite(value)):
                raise ValueError(
                    f"input {name} must be 3 finite numbers (R, G, B), got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"input std must be > 0 for every channel, got {self.std!r}")
        object.__setattr__(self, "size", int(self.size))
        if self.layout != "NCHW":
            raise ValueError(f"input layout {self.layout!r} is not supported; only 'NCHW' is")
        if self.color != "RGB":
            raise ValueError(f"input color {self.color!r} is not supported; only 'RGB' is")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples)."""
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "color": self.color,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """Inverse of to_dict; `color` may be absent (RGB). ValueError names a missing or unknown key."""
        known = {"size", "mean", "std", "layout", "color"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"input spec has unknown keys {unknown}; expected some of {sorted(known)}")
        missing = sorted({"size", "mean", "std"} - set(d))
        if missing:
            raise ValueError(f"input spec lacks {missing}; it needs size, mean and std")
        return cls(
            size=d["size"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            layout=d.get("layout", "NCHW"),
            color=d.get("color", "RGB"),
        )


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 (H, W, 3) BGR, got dtype {frame.dtype} shape {frame.shape}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2 and frame.size:
        return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.size == 0:
        raise ValueError(f"frame must be uint8 (H, W, 3) BGR or (H, W) grayscale, got shape {frame.shape}")
    return np.ascontiguousarray(frame)


def resize_to(frame_bgr: np.ndarray, size: int) -> np.ndarray:
    """Squash a frame to size x size: INTER_AREA when shrinking (no aliasing), bilinear when enlarging."""
    h, w = frame_bgr.shape[:2]
    if (h, w) == (size, size):
        return frame_bgr
    interp = cv2.INTER_AREA if h * w >= size * size else cv2.INTER_LINEAR
    return cv2.resize(frame_bgr, (size, size), interpolation=interp)


def _blob_params(spec: InputSpec) -> cv2.dnn.Image2BlobParams:
    # blob = (x - 255 * mean) * scalefactor, per channel, after the BGR -> RGB swap
    return cv2.dnn.Image2BlobParams(
        scalefactor=(*tuple(1.0 / (255.0 * s) for s in spec.std), 0.0),
        size=(spec.size, spec.size),
        mean=(*tuple(255.0 * m for m in spec.mean), 0.0),
        swapRB=True,
        ddepth=cv2.CV_32F,
    )


def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32:
        got = (out.shape, out.dtype) if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out buffer must be float32 {shape}, got {got}; allocate it from the input spec")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out buffer must be C-contiguous and writeable")


def _convert(img: np.ndarray, params: cv2.dnn.Image2BlobParams, out: np.ndarray) -> None:
    # one pass: swap, scale, shift and HWC -> CHW straight into `out` (the resize is a no-op here)
    blob = cv2.dnn.blobFromImageWithParams(img, out, params)
    if not np.shares_memory(blob, out):  # an OpenCV build that ignores the output argument
        out[...] = blob


def preprocess(frame_bgr: np.ndarray, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 BGR frame (or (H, W) grayscale) -> (1, 3, S, S) float32 normalised RGB.

    Writes into `out` (float32, C-contiguous, (1, 3, S, S)) when given, so the frame loop reuses one
    buffer; returns the tensor. ValueError, with the shape, for anything else.
    """
    S = spec.size
    if out is None:
        out = np.empty((1, 3, S, S), dtype=np.float32)
    else:
        _check_out(out, (1, 3, S, S))
    _convert(resize_to(_as_bgr(frame_bgr), S), _blob_params(spec), out)
    return out


def preprocess_batch(frames: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(F, H, W, 3) uint8 BGR frames (normally H = W = S) -> (F, 3, S, S) float32, frame by frame exactly
    as preprocess does, so training and runtime see identical tensors."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (F, H, W, 3) BGR, got dtype {frames.dtype} shape {frames.shape}"
        )
    S = spec.size
    out = np.empty((len(frames), 3, S, S), dtype=np.float32)
    params = _blob_params(spec)
    for i, frame in enumerate(frames):
        _convert(resize_to(_as_bgr(frame), S), params, out[i : i + 1])
    return out
