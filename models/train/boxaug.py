"""Box-aware training signals from the dataset's own annotation boxes (TAO gives one per object).

Three pieces, all on the training split only:
- copy-paste (Ghiasi et al., CVPR 2021): an object box from another frame of the batch is pasted at a
  random place, so objects appear over foreign scenes and beside foreign classes. Scenes keep their
  classes for a whole video, and without this a small ViT learns "this scene -> these labels";
- boxes follow the crop/flip of ``augment.augment_geometry``, and a class whose every box is cropped
  away loses its frame label (a crop must not keep a label for an object it removed);
- patch-token targets (token labelling, Jiang et al., NeurIPS 2021): every patch token gets the classes
  whose boxes cover it, a dense signal that teaches the ViT what objects look like from few frames.

Boxes are (n, 5) float32 arrays per frame: [class column, x0, y0, x1, y1] in input pixels (edges 0..S).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from polymorphd.models.train.augment import Geometry

Boxes = list[np.ndarray]


def _hidden_share(own: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Share of each box in ``own`` that the rectangle (x0, y0, x1, y1) covers."""
    ix = np.clip(np.minimum(own[:, 3], x1) - np.maximum(own[:, 1], x0), 0, None)
    iy = np.clip(np.minimum(own[:, 4], y1) - np.maximum(own[:, 2], y0), 0, None)
    area = np.maximum((own[:, 3] - own[:, 1]) * (own[:, 4] - own[:, 2]), 1e-6)
    return ix * iy / area


def _drop_lost(y: torch.Tensor, i: int, before: np.ndarray, after: np.ndarray) -> None:
    """Clear frame i's label for every class that had boxes before and has none left."""
    for col in set(before[:, 0].astype(int).tolist()) - set(after[:, 0].astype(int).tolist()):
        y[i, col] = 0


def paste_objects(
    frames: torch.Tensor,
    y: torch.Tensor,
    boxes: Sequence[np.ndarray],
    prob: float,
    gen: torch.Generator,
    cover: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, Boxes, list[int]]:
    """With probability ``prob`` per frame, paste one box region of another frame of the batch.

    ``frames`` (B, S, S, 3) uint8, ``y`` (B, K). The frame gains the pasted class; its boxes more than
    ``cover`` hidden are removed, with their labels when no box of the class is left. Also returns each
    frame's donor (the frame it got an object from, in the order pasted; -1: none), so what else belongs to
    the object (its sound) can follow it.
    """
    b, s = frames.shape[0], frames.shape[1]
    boxes = [np.asarray(bx, dtype=np.float32).reshape(-1, 5) for bx in boxes]
    donors = [-1] * b
    if prob <= 0 or b < 2:
        return frames, y, boxes, donors
    out, y = frames.clone(), y.clone()
    for i in range(b):
        if float(torch.rand(1, generator=gen)) >= prob:
            continue
        j = (i + 1 + int(torch.randint(0, b - 1, (1,), generator=gen))) % b  # any other frame
        if len(boxes[j]) == 0:
            continue
        c, x0, y0, x1, y1 = boxes[j][int(torch.randint(0, len(boxes[j]), (1,), generator=gen))]
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(s, math.ceil(x1)), min(s, math.ceil(y1))
        w, h = x1 - x0, y1 - y0
        if w < 2 or h < 2:
            continue
        px = int(torch.randint(0, s - w + 1, (1,), generator=gen))
        py = int(torch.randint(0, s - h + 1, (1,), generator=gen))
        # from out, not frames: boxes[j] describe frame j as it is now (it may have received a paste)
        out[i, py : py + h, px : px + w] = out[j, y0:y1, x0:x1]
        own = boxes[i]
        kept = own[_hidden_share(own, px, py, px + w, py + h) <= cover]
        _drop_lost(y, i, own, kept)
        y[i, int(c)] = 1
        boxes[i] = np.concatenate([kept, np.array([[c, px, py, px + w, py + h]], np.float32)])
        donors[i] = j
    return out, y, boxes, donors


def move_boxes(
    boxes: Sequence[np.ndarray], y: torch.Tensor, geom: Geometry, size: int, keep: float = 0.25
) -> tuple[Boxes, torch.Tensor]:
    """Boxes after the crop/flip ``geom``; boxes less than ``keep`` visible are dropped, and so is the
    frame label of a class whose boxes are all gone."""
    y = y.clone()
    out = []
    for i, bx in enumerate(boxes):
        if len(bx) == 0:
            out.append(bx)
            continue
        n = bx[:, 1:] * (2.0 / size) - 1.0  # pixel edges -> normalised coordinates
        sx, sy = float(geom.scale_x[i]), float(geom.scale_y[i])
        tx, ty = float(geom.shift_x[i]), float(geom.shift_y[i])
        ux = (n[:, [0, 2]] - tx) / sx  # output point u shows input point scale * u + shift
        uy = (n[:, [1, 3]] - ty) / sy
        moved = np.stack([ux.min(1), uy.min(1), ux.max(1), uy.max(1)], axis=1)
        full = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        clipped = np.clip(moved, -1.0, 1.0)
        vis = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        ok = vis >= keep * np.maximum(full, 1e-9)
        res = np.concatenate([bx[:, :1], (clipped + 1.0) * (size / 2.0)], axis=1)[ok].astype(np.float32)
        _drop_lost(y, i, bx, res)
        out.append(res)
    return out, y


def patch_targets(boxes: Sequence[np.ndarray], num_classes: int, size: int, patch: int) -> torch.Tensor:
    """(B, g*g, K) targets in the ViT's patch order (row-major): 1 where a class's box covers at least
    a quarter of the patch."""
    g = size // patch
    edges = np.arange(g, dtype=np.float32) * patch
    out = np.zeros((len(boxes), g * g, num_classes), dtype=np.float32)
    for i, bx in enumerate(boxes):
        if len(bx) == 0:
            continue
        ix = np.clip(np.minimum(bx[:, None, 3], edges + patch) - np.maximum(bx[:, None, 1], edges), 0, None)
        iy = np.clip(np.minimum(bx[:, None, 4], edges + patch) - np.maximum(bx[:, None, 2], edges), 0, None)
        share = iy[:, :, None] * ix[:, None, :] / patch**2  # (n, rows, cols)
        hit = (share >= 0.25).reshape(len(bx), g * g)
        for col, h in zip(bx[:, 0].astype(int), hit, strict=True):
            out[i, :, col] = np.maximum(out[i, :, col], h)
    return torch.from_numpy(out)
