"""Why the demo's live F1 sits below the test split's: a bundle on fresh ``synthetic:`` stream videos.

    python bench/live_gap.py BUNDLE [FRAMES]

Scores the demo's stream (the same ``synthetic:`` URI ``polymorphd demo`` serves) frame by frame, as rendered
and after the dataset's JPEG round trip, in ``full`` and ``polymorph``; then ``full``'s label F1 per video and
the range a 12-video split (the default test split's size) samples from those videos.
"""

from __future__ import annotations

import itertools
import sys

import cv2
import numpy as np

from polymorphd.daemon.engine import load_engine
from polymorphd.daemon.sources import _synth_config
from polymorphd.daemon.tools import demo
from polymorphd.models.data.synth import JPEG_QUALITY, SynthStream


def frame_f1(pred: set[int], truth: set[int]) -> float:
    return 1.0 if not pred and not truth else 2 * len(pred & truth) / (len(pred) + len(truth))


def jpeg(img: np.ndarray) -> np.ndarray:
    buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def main(bundle: str, n: int = 3000) -> None:
    cfg, seed = _synth_config(f"synthetic:?seed={demo.DATA_SEED}&stream_seed={demo.STREAM_SEED}")
    stream = SynthStream(cfg, seed=seed)
    engine = load_engine(bundle)
    column = {name: i for i, name in enumerate(engine.classes)}
    to_col = [column[name] for name in stream.class_names]
    frames = list(itertools.islice(iter(stream), n))
    truths = [{to_col[o.class_index] for o in fr.objects} for fr in frames]

    def scores(mode: str, decode) -> list[float]:
        engine.set_knobs(mode=mode)
        out, state = [], engine.new_state()
        for i, (fr, truth) in enumerate(zip(frames, truths, strict=True)):
            if i % cfg.frames_per_video == 0:
                state = engine.new_state()  # the policy's memory never crosses videos
            r = engine.infer(decode(fr.image), state)
            out.append(frame_f1({int(x) for x in r.labels}, truth))
        return out

    for mode in ("full", "polymorph"):
        for kind, decode in (("rendered", lambda im: im), ("jpeg", jpeg)):
            print(f"{mode:10s} {kind:9s} {n} frames: label F1 {np.mean(scores(mode, decode)):.3f}")
    full = np.asarray(scores("full", lambda im: im))
    per = full[: len(full) // cfg.frames_per_video * cfg.frames_per_video].reshape(-1, cfg.frames_per_video)
    per = per.mean(axis=1)
    rng = np.random.default_rng(0)
    m12 = [rng.choice(per, 12, replace=False).mean() for _ in range(2000)]
    print(
        f"full, per video: {per.size} videos, mean {per.mean():.3f}, std {per.std():.3f}; the mean of 12 of "
        f"them: 5-95 % {np.percentile(m12, 5):.3f} - {np.percentile(m12, 95):.3f}"
    )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
