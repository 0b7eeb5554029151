"""Procedural object classes for the pretraining corpus. Torch-free (numpy + OpenCV).

Each class is a seeded recipe: an outline (a star-convex polygon, optionally with a hole) filled with a
texture (flat, stripes, checks, dots, rings, blotches). Its exemplars vary the recipe a little (outline
jitter, rotation, texture phase), as photos of one object kind vary. None of them is a default-dataset class
(fashion-mnist, digits, glyphs), so a backbone pretrained on them has never seen the classes it is
fine-tuned on: it can only bring general skills (finding objects on clutter, outline, texture, colour).
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

PROC_CLASSES = 512  # far more than any corpus needs: the class count is the corpus's choice
TEXTURES = ("flat", "stripes", "checks", "dots", "rings", "blotches")
VARIANTS = 12
SIZE = 64  # rendered size, before sprites cuts exemplars to content at its EXEMPLAR_SIZE


def proc_name(index: int) -> str:
    return f"{index:03d}"


def _recipe(index: int) -> dict:
    rng = np.random.default_rng([zlib.crc32(b"proc"), index])
    n = int(rng.integers(3, 10))
    return {
        "radii": rng.uniform(0.45, 1.0, n),
        "smooth": bool(rng.random() < 0.4),  # rounded outline
        "hole": float(rng.uniform(0.25, 0.45)) if rng.random() < 0.2 else 0.0,
        "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
        "freq": float(rng.uniform(2.0, 6.0)),
        "angle": float(rng.uniform(0, np.pi)),
        "aspect": float(rng.uniform(0.6, 1.0)),
    }


def _texture(kind: str, freq: float, angle: float, phase: float, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5  # (S, S) each, centred
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    w = 2 * np.pi * freq
    if kind == "flat":
        t = np.ones_like(x)
    elif kind == "stripes":
        t = (np.sin(w * u + phase) > 0).astype(np.float32)
    elif kind == "checks":
        t = ((np.sin(w * u + phase) > 0) ^ (np.sin(w * v + phase) > 0)).astype(np.float32)
    elif kind == "dots":
        t = ((np.sin(w * u + phase) * np.sin(w * v + phase)) > 0.5).astype(np.float32)
    elif kind == "rings":
        t = (np.sin(w * np.hypot(x, y) * 1.5 + phase) > 0).astype(np.float32)
    else:  # blotches: smoothed noise, thresholded
        noise = cv2.GaussianBlur(rng.random((SIZE, SIZE)).astype(np.float32), (0, 0), SIZE / (2 * freq))
        t = (noise > np.median(noise)).astype(np.float32)
    return 0.35 + 0.65 * t  # the texture never hides the outline: every pixel of the object stays visible


def _outline(r: dict, rng: np.random.Generator) -> np.ndarray:
    radii = r["radii"] * rng.uniform(0.9, 1.1, len(r["radii"]))
    rot = rng.uniform(-0.35, 0.35)
    ang = rot + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    c, scale = SIZE / 2, SIZE * 0.46
    pts = np.stack([c + scale * radii * np.cos(ang), c + scale * r["aspect"] * radii * np.sin(ang)], 1)
    mask = np.zeros((SIZE, SIZE), np.float32)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1.0)
    if r["smooth"]:
        mask = (cv2.GaussianBlur(mask, (0, 0), 3.0) > 0.5).astype(np.float32)
    if r["hole"]:
        cv2.circle(mask, (int(c), int(c)), int(scale * r["hole"]), 0.0, -1)
    return mask


def _exemplar(r: dict, rng: np.random.Generator) -> np.ndarray:
    mask = _outline(r, rng)
    tex = _texture(r["texture"], r["freq"], r["angle"] + rng.uniform(-0.2, 0.2), rng.uniform(0, 6.3), rng)
    return mask * tex


def render(index: int) -> list[np.ndarray]:
    """VARIANTS renderings (SIZE, SIZE) float32 in [0, 1] of procedural class ``index``, identical everywhere.

    sprites.load_proc cuts them to content like every other source's exemplars.
    """
    if not 0 <= index < PROC_CLASSES:
        raise ValueError(f"procedural class {index} does not exist: choose 0..{PROC_CLASSES - 1}")
    r = _recipe(index)
    rng = np.random.default_rng([zlib.crc32(b"proc-variants"), index])
    return [_exemplar(r, rng) for _ in range(VARIANTS)]
