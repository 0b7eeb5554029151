"""Object appearance for the synthetic video generator. Torch-free (numpy + OpenCV).

Each class is one (source, class) pair with exemplar images: real product photos
from Debian's fashion-mnist, real handwriting from scikit-learn's digits, and
OpenCV-rendered glyphs (shapes and letters), which are always available and fill
the class list when the others are missing. The pretraining corpus draws from a
fourth source, procedural objects (procedural.py), which no default class shares.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.data import procedural

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCES = ("fmnist", "digit", "glyph")  # the default dataset's sources, in class order
ALL_SOURCES = (*SOURCES, "proc")  # "proc": procedural objects, the pretraining corpus's classes
FMNIST_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
# Letters that are not look-alikes of a shape (O ~ ring) or of each other (l ~ I).
LETTERS = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ") + tuple("abdefghnqrt")
GLYPH_NAMES = SHAPES + LETTERS

GOLDEN, HUE_JITTER = 0.6180339887, 10.0  # class hues spread evenly; jitter in OpenCV hue steps (of 180)
EXEMPLAR_SIZE = 32  # exemplars are square float32 intensity maps in [0, 1]
FMNIST_IMAGES = 6000  # read only the head of the file: ~600 exemplars per class is plenty
GLYPH_VARIANTS = 16
# Per source: (alpha gain, darkest shade) -- fmnist keeps its texture, glyphs are flat.
RENDER_STYLE = {"fmnist": (3.0, 0.35), "digit": (2.0, 0.5), "glyph": (1.0, 1.0), "proc": (1.5, 0.35)}


@dataclass(frozen=True)
class ClassBank:
    names: tuple[str, ...]  # "fmnist/trouser", "digit/3", "glyph/K"
    sources: tuple[str, ...]  # the source of each class (keys of RENDER_STYLE)
    exemplars: tuple[np.ndarray, ...]  # per class: (N, S, S) float32 in [0, 1], read-only


def _fmnist_files(directory: Path) -> tuple[Path, Path]:
    return directory / "train-images-idx3-ubyte.gz", directory / "train-labels-idx1-ubyte.gz"


def fmnist_available(directory: Path | None = None) -> bool:
    return all(p.is_file() for p in _fmnist_files(directory or FASHION_MNIST_DIR))


def digits_available() -> bool:
    try:
        import sklearn.datasets  # noqa: F401  (a dev extra: optional)
    except ImportError:
        return False
    return True


def available_class_names(sources: tuple[str, ...] = SOURCES, fmnist_dir: Path | None = None) -> list[str]:
    """Class names in generator order from the sources that are installed, without loading them."""
    names: list[str] = []
    for src in sources:
        if src == "fmnist" and fmnist_available(fmnist_dir):
            names += [f"fmnist/{n}" for n in FMNIST_NAMES]
        elif src == "digit" and digits_available():
            names += [f"digit/{d}" for d in range(10)]
        elif src == "glyph":
            names += [f"glyph/{g}" for g in GLYPH_NAMES]
        elif src == "proc":
            names += [f"proc/{procedural.proc_name(i)}" for i in range(procedural.PROC_CLASSES)]
    return names


def max_classes(sources: tuple[str, ...]) -> int:
    """How many classes ``sources`` can give at most (every source installed)."""
    per = {
        "fmnist": len(FMNIST_NAMES),
        "digit": 10,
        "glyph": len(GLYPH_NAMES),
        "proc": procedural.PROC_CLASSES,
    }
    return sum(per[s] for s in sources if s in per)


def _read_idx(path: Path, magic: int, count: int) -> np.ndarray:
    """The first ``count`` items of a gzipped IDX file (big-endian header, uint8 payload)."""
    try:
        with gzip.open(path, "rb") as fh:
            head = np.frombuffer(fh.read(4), dtype=">u4")
            if head.size != 1 or int(head[0]) != magic:
                raise DataError(f"{path}: not an IDX file with magic {magic:#010x}; the file is corrupt")
            ndim = magic & 0xFF
            dims = np.frombuffer(fh.read(4 * ndim), dtype=">u4").astype(int).tolist()
            n = min(count, dims[0])
            item = int(np.prod(dims[1:], dtype=np.int64))
            data = fh.read(n * item)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read fashion-mnist: {exc}") from exc
    if len(data) != n * item:
        raise DataError(f"{path}: truncated: expected {n * item} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(n, *dims[1:])


def _frame_exemplar(img: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Crop to content, pad to a centred square with a small margin, resize to EXEMPLAR_SIZE."""
    ys, xs = np.nonzero(img > threshold)
    if ys.size:
        img = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = img.shape
    side = int(max(h, w) * 1.08) + 2
    canvas = np.zeros((side, side), np.float32)
    y0, x0 = (side - h) // 2, (side - w) // 2
    canvas[y0 : y0 + h, x0 : x0 + w] = img
    return cv2.resize(canvas, (EXEMPLAR_SIZE, EXEMPLAR_SIZE), interpolation=cv2.INTER_AREA)


def _stack(items: list[np.ndarray]) -> np.ndarray:
    arr = np.clip(np.stack(items), 0.0, 1.0).astype(np.float32)
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=4)
def load_fmnist(directory: str) -> tuple[np.ndarray, ...]:
    """Fashion-mnist exemplars per class (10 arrays), decoded once per process."""
    img_path, lbl_path = _fmnist_files(Path(directory))
    images = _read_idx(img_path, 0x00000803, FMNIST_IMAGES)
    labels = _read_idx(lbl_path, 0x00000801, FMNIST_IMAGES)
    if len(images) != len(labels):
        raise DataError(f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path}")
    out = []
    for k in range(10):
        sel = images[labels == k]
        if not len(sel):
            raise DataError(
                f"{lbl_path}: no image of class {k} ({FMNIST_NAMES[k]}) in the first {len(labels)}"
            )
        out.append(_stack([_frame_exemplar(im.astype(np.float32) / 255.0) for im in sel]))
    log.info("fashion-mnist: %d exemplars from %s", len(images), directory)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, ...]:
    """scikit-learn digits exemplars per class (10 arrays), upscaled 8x8 -> 32x32 once per process."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    out = []
    for k in range(10):
        sel = bunch.images[bunch.target == k] / 16.0
        up = [cv2.resize(im.astype(np.float32), (24, 24), interpolation=cv2.INTER_CUBIC) for im in sel]
        out.append(_stack([_frame_exemplar(np.clip(u, 0, 1)) for u in up]))
    return tuple(out)


def _star(c: float, r: float, rot: float) -> np.ndarray:
    ang = rot + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return np.stack([c + rad * np.sin(ang), c - rad * np.cos(ang)], 1)


def _polygon(c: float, r: float, n: int, rot: float) -> np.ndarray:
    ang = rot + np.arange(n) * 2 * np.pi / n
    return np.stack([c + r * np.sin(ang), c - r * np.cos(ang)], 1)


def _render_glyph(name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    c, r = size / 2, size * rng.uniform(0.34, 0.42)
    rot = rng.uniform(-0.25, 0.25)  # radians: a slight tilt, never enough to change the shape's identity
    thick = int(rng.integers(4, 9))
    aa = cv2.LINE_AA
    if name in SHAPES:
        poly = {
            "square": lambda: _polygon(c, r * 1.2, 4, rot + np.pi / 4),
            "triangle": lambda: _polygon(c, r * 1.15, 3, rot),
            "star": lambda: _star(c, r * 1.15, rot),
            "diamond": lambda: _polygon(c, r, 4, rot) * [0.75, 1] + [c * 0.25, 0],
            "hexagon": lambda: _polygon(c, r * 1.05, 6, rot),
        }.get(name)
        if poly is not None:
            cv2.fillPoly(img, [np.round(poly() * 16).astype(np.int32)], 255, aa, shift=4)
        elif name == "circle":
            cv2.circle(img, (int(c), int(c)), int(r), 255, -1, aa)
        elif name == "ring":
            cv2.circle(img, (int(c), int(c)), int(r), 255, thick + 2, aa)
        elif name == "cross":
            for a in (rot, rot + np.pi / 2):
                d = np.array([np.cos(a), np.sin(a)]) * r * 1.1
                p0, p1 = np.round(c - d).astype(int), np.round(c + d).astype(int)
                cv2.line(img, tuple(p0.tolist()), tuple(p1.tolist()), 255, thick + 3, aa)
    else:
        font = [
            cv2.FONT_HERSHEY_SIMPLEX,
            cv2.FONT_HERSHEY_DUPLEX,
            cv2.FONT_HERSHEY_COMPLEX,
            cv2.FONT_HERSHEY_TRIPLEX,
        ][int(rng.integers(4))]
        scale = 1.6
        (tw, th), base = cv2.getTextSize(name, font, scale, thick)
        org = (int(c - tw / 2), int(c + (th - base) / 2 + base / 2))
        cv2.putText(img, name, org, font, scale, 255, thick, aa)
        rotm = cv2.getRotationMatrix2D((c, c), float(np.degrees(rot)), 1.0)
        img = cv2.warpAffine(img, rotm, (size, size), flags=cv2.INTER_LINEAR)
    return img.astype(np.float32) / 255.0


@functools.lru_cache(maxsize=len(GLYPH_NAMES))
def load_glyph(name: str) -> np.ndarray:
    """GLYPH_VARIANTS renderings of one glyph (font, stroke, tilt), identical in every process."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return _stack([_frame_exemplar(_render_glyph(name, rng)) for _ in range(GLYPH_VARIANTS)])


@functools.lru_cache(maxsize=procedural.PROC_CLASSES)
def load_proc(index: int) -> np.ndarray:
    """The exemplars of procedural class ``index`` (procedural.py), framed like every other source's."""
    return _stack([_frame_exemplar(img) for img in procedural.render(index)])


@functools.lru_cache(maxsize=8)
def build_bank(
    num_classes: int, sources: tuple[str, ...] = SOURCES, fmnist_dir: str | None = None
) -> ClassBank:
    """The first ``num_classes`` classes of the installed sources, in ``sources`` order."""
    unknown = [s for s in sources if s not in ALL_SOURCES]
    if unknown:
        raise ConfigError(f"unknown class source(s) {unknown}; expected some of {list(ALL_SOURCES)}")
    fdir = Path(fmnist_dir) if fmnist_dir else FASHION_MNIST_DIR
    names = available_class_names(sources, fdir)
    if num_classes > len(names):
        missing = [s for s in ("fmnist", "digit") if s in sources and not any(n.startswith(s) for n in names)]
        hint = f" ({', '.join(missing)} not installed)" if missing else ""
        raise ConfigError(
            f"num_classes={num_classes} but only {len(names)} classes are available from {list(sources)}{hint}; "
            "ask for fewer classes or add sources"
        )
    names = names[:num_classes]
    log.debug("classes: %s", names)
    exemplars = []
    for name in names:
        src, cls = name.split("/", 1)
        if src == "fmnist":
            exemplars.append(load_fmnist(str(fdir))[FMNIST_NAMES.index(cls)])
        elif src == "digit":
            exemplars.append(load_digits()[int(cls)])
        elif src == "proc":
            exemplars.append(load_proc(int(cls)))
        else:
            exemplars.append(load_glyph(cls))
    return ClassBank(tuple(names), tuple(n.split("/")[0] for n in names), tuple(exemplars))


@dataclass
class SceneObject:
    """One object instance in a scene: fixed appearance, moving centre (mutable simulation state)."""

    track_id: int
    cls: int
    sprite: np.ndarray  # (S, S, 3) float32 BGR colour
    alpha: np.ndarray  # (S, S, 1) float32 opacity
    halo: np.ndarray  # (S, S, 1) float32: alpha dilated, a dark outline for contrast on any background
    box: tuple[int, int, int, int]  # tight content box inside the sprite: x0, y0, x1, y1
    pos: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre (x, y), pixels
    vel: np.ndarray = field(default_factory=lambda: np.zeros(2))  # pixels per frame

    @property
    def size(self) -> int:
        return self.alpha.shape[0]


def make_object(
    bank: ClassBank,
    cls: int,
    track_id: int,
    size: int,
    rng: np.random.Generator,
    exemplars: int = 0,
    class_colours: bool = False,
) -> SceneObject:
    """A random exemplar of class ``cls`` (among its first ``exemplars``; 0 = all) at ``size`` px, brightly tinted.

    ``class_colours``: the hue is the class's own (spread by the golden ratio) within +-HUE_JITTER, as many
    real object categories have a typical colour; otherwise any hue.
    """
    pool = bank.exemplars[cls]
    ex = pool[int(rng.integers(min(exemplars, len(pool)) if exemplars else len(pool)))]
    g = cv2.resize(ex, (size, size), interpolation=cv2.INTER_AREA if size < ex.shape[0] else cv2.INTER_LINEAR)
    g = np.pad(np.clip(g, 0, 1), 2)  # room for the halo
    gain, shade = RENDER_STYLE[bank.sources[cls]]
    alpha = np.clip(g * gain, 0, 1)
    hue = (
        (cls * GOLDEN * 180 + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 180
        if class_colours
        else rng.uniform(0, 180)
    )
    hsv = np.array([[[hue, rng.uniform(40, 230), 255]]], np.uint8)
    tint = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).reshape(3).astype(np.float32)
    sprite = (tint * (shade + (1 - shade) * g)[..., None]).astype(np.float32)
    halo = cv2.dilate(alpha, np.ones((5, 5), np.uint8))
    ys, xs = np.nonzero(alpha > 0.25)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if ys.size else (0, 0, 1, 1)
    return SceneObject(track_id, cls, sprite, alpha[..., None], halo[..., None], box)


def _bounds(obj: SceneObject, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.full(2, obj.size / 2)
    return lo, np.maximum(lo, np.array([width, height]) - obj.size / 2)


def place(
    obj: SceneObject,
    others: list[SceneObject],
    width: int,
    height: int,
    vmax: float,
    rng: np.random.Generator,
) -> None:
    """Start where the object overlaps the others least (best of a few tries), fully inside the frame."""
    lo, hi = _bounds(obj, width, height)
    tries = rng.uniform(lo, hi, (8, 2))
    if others:
        dist = np.min([np.linalg.norm(tries - o.pos, axis=1) for o in others], axis=0)
        obj.pos = tries[int(np.argmax(dist))]
    else:
        obj.pos = tries[0]
    obj.vel = rng.normal(0, vmax / 2, 2)


def step(objs: list[SceneObject], width: int, height: int, vmax: float, rng: np.random.Generator) -> None:
    """Smooth motion: small random accelerations, a speed limit, soft repulsion, bounce at the borders."""
    for o in objs:
        o.vel = o.vel + rng.normal(0, 0.15 * vmax, 2)
        for p in objs:
            d = o.pos - p.pos
            gap = float(np.linalg.norm(d))
            if p is not o and 0 < gap < (o.size + p.size) / 2:
                o.vel = o.vel + 0.1 * vmax * d / gap
        speed = float(np.linalg.norm(o.vel))
        if speed > vmax:
            o.vel = o.vel * (vmax / speed)
        lo, hi = _bounds(o, width, height)
        pos = o.pos + o.vel
        below, above = pos < lo, pos > hi
        o.pos = np.clip(np.where(below, 2 * lo - pos, np.where(above, 2 * hi - pos, pos)), lo, hi)
        o.vel = np.where(below | above, -o.vel, o.vel)


def draw(image: np.ndarray, obj: SceneObject, halo: float) -> tuple[float, float, float, float]:
    """Composite one object in place (darkening halo, then colour); return its tight box (x, y, w, h)."""
    size = obj.size
    x, y = (np.round(obj.pos).astype(int) - size // 2).tolist()
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + size), min(h, y + size)
    sl = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    region = image[y0:y1, x0:x1].astype(np.float32)
    region *= 1 - halo * obj.halo[sl]
    a = obj.alpha[sl]
    region = region * (1 - a) + obj.sprite[sl] * a
    image[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
    bx0, by0 = max(x + obj.box[0], 0), max(y + obj.box[1], 0)
    bx1, by1 = min(x + obj.box[2], w), min(y + obj.box[3], h)
    return (float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0))
