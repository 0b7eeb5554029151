"""``polymorphd eval``: stream a dataset split through the engine, video by video, in frame order.

Every frame of a video goes through the engine (TAO annotates about one frame per second, but the policy's
temporal memory needs the frames in between); metrics use the annotated frames. The policy state is reset per
video. ``--mode all`` runs every mode in one process, interleaved by video (the mode order rotates per video) so
machine noise hits all modes alike; frames are decoded once per video, outside the timed region.

Definitions: mAP is macro AP over the classes with >= 1 positive among the evaluated annotated frames (the
same as training's report, ``models.metrics.mean_average_precision``). Label F1 (mean per-frame F1) and
exact match score the label sets the engine publishes (``FrameResult.labels``: above the class thresholds,
or above the exit's ``hi`` where an exit answered), per mode and per answering exit
(``models.core.metrics.label_quality``): mAP ranks scores, subscribers receive label sets. Latency is
preprocess + inference per frame (no disk read); fps = 1000 / mean latency; overhead is the engine's time
outside ONNX Runtime calls (excluding preprocessing); speedup is full's median latency over the mode's.
Torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from polymorphd.daemon.engine import Engine, load_engine
from polymorphd.daemon.tools.evalprint import format_footer, format_table
from polymorphd.models.core.contexts import greedy_cover
from polymorphd.models.core.countrule import count_mae
from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.core.knobs import PolicyKnobs, parse_knobs
from polymorphd.models.core.melspec import log_mel
from polymorphd.models.core.metrics import (
    frame_f1,
    label_quality,
    mean_average_precision,
    percentile_interval,
    video_resamples,
)
from polymorphd.models.core.modes import MODES
from polymorphd.models.data.audio import split_windows
from polymorphd.models.data.tao import Frame, TaoSplit, evaluation_split, load_split

log = logging.getLogger(__name__)

MAP_DEFINITION = (
    "macro-averaged AP (scikit-learn's step-wise definition) over the classes with >= 1 positive among the "
    "annotated frames of the evaluated split"
)
LABEL_DEFINITION = (
    "mean over annotated frames of the F1 between the published label set and the truth (1 when both are "
    "empty); exact match: share of frames whose published set equals the truth"
)
WARMUP_FRAMES = 3
AUDIO_SUFFIX = "+audio"  # the row of a mode run through the audiovisual exits (a bundle with audio)


@dataclass
class _ModeRecord:
    mode: str
    latency: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    ort: list[float] = field(default_factory=list)
    preprocess: list[float] = field(default_factory=list)
    gflops: list[float] = field(default_factory=list)
    adapters: list[int] = field(default_factory=list)
    exits: Counter = field(default_factory=Counter)
    scores: list[np.ndarray] = field(default_factory=list)  # annotated frames only
    labels: list[list[int]] = field(default_factory=list)  # published label indices, annotated frames only
    answered: list[int | str] = field(default_factory=list)  # the exit that answered, annotated frames only
    rows: list[int] = field(default_factory=list)  # row in the truth matrix for each score
    cpu: list[float] = field(default_factory=list)  # process CPU ms per frame (all threads), for energy
    energy: list[float | None] = field(default_factory=list)  # metered mJ per frame, where a meter exists
    # every frame's (answering exit, context ids run), in stream order: what bench replays at real size
    decisions: list[tuple[int | str, tuple[int, ...]]] = field(default_factory=list)
    knobs: dict[str, Any] = field(default_factory=dict)
    ann_adapters: list[int] = field(default_factory=list)  # adapters run, annotated frames only
    ann_chosen: list[list[int]] = field(default_factory=list)  # their context ids, annotated frames only
    counts: list[tuple[float, int]] = field(default_factory=list)  # (published, true) on annotated frames


@dataclass
class EvalResult:
    report: dict[str, Any]  # JSON-ready
    latencies: dict[str, np.ndarray]  # per-frame latency (ms) per mode, for plots
    decisions: dict[str, list[tuple[int | str, tuple[int, ...]]]] = field(default_factory=dict)


def class_columns(engine: Engine, split: TaoSplit) -> list[int]:
    """The bundle's class ids, checked against the dataset's categories (DataError when they don't match)."""
    known = set(split.category_ids())
    missing = [(n, c) for n, c in zip(engine.classes, engine.class_ids, strict=True) if c not in known]
    if missing:
        shown = ", ".join(f"{n} (id {c})" for n, c in missing[:5])
        raise DataError(
            f"{len(missing)} of the bundle's {len(engine.classes)} classes are not categories of dataset "
            f"{split.root} split {split.name!r}: {shown}{'...' if len(missing) > 5 else ''}. The bundle was "
            "trained on another dataset; evaluate it on the data it was trained for"
        )
    extra = known - set(engine.class_ids)
    if extra:
        log.warning(
            "dataset %s has %d categories the bundle does not know (e.g. id %d); their labels are ignored",
            split.root, len(extra), min(extra),
        )  # fmt: skip
    return engine.class_ids


def _read(frame: Frame) -> np.ndarray:
    img = cv2.imread(str(frame.path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(
            f"{frame.path}: cannot read frame {frame.frame_index} of video {frame.video_id} "
            "(missing, corrupt or not an image)"
        )
    return img


def evaluate(
    engine: Engine,
    split: TaoSplit,
    modes: list[str] | tuple[str, ...] | dict[str, dict[str, Any]],
    *,
    max_frames: int | None = None,
    progress: bool = False,
    meter: Any = None,
    resamples: int = 0,
) -> EvalResult:
    """Stream ``split`` through ``engine`` in each of ``modes`` (interleaved by video); return the report.

    ``modes`` is a list of mode names, or named operating points: ``{name: knobs}`` where knobs (flat names,
    as ``Engine.set_knobs`` takes them) include ``mode`` and apply over the engine's knobs at the start; the
    report's ``modes`` is keyed by those names (``bench``'s sweep). ``meter`` (``daemon.power.Meter``) adds the
    measured energy per frame where it knows it. ``resamples`` > 0 adds 95 % video-bootstrap intervals
    (``add_intervals``)."""
    points = {m: {"mode": m} for m in modes} if not isinstance(modes, dict) else dict(modes)
    for name, knobs in points.items():
        m = knobs.get("mode")
        if m not in MODES:
            raise ConfigError(
                f"mode {m!r} invalid{'' if m == name else f' (point {name!r})'}: choose among "
                f"{', '.join(MODES)}"
            )
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be >= 1, got {max_frames}")
    if resamples < 0:
        raise ConfigError(f"--resamples must be >= 0, got {resamples}")
    ids = class_columns(engine, split)
    videos = list(split.videos)
    budget = sum(len(v.frames) for v in videos)
    if max_frames is not None:
        budget = min(budget, max_frames)
    if budget == 0:
        raise DataError(f"split {split.name!r} of {split.root} has no frames to evaluate")
    annotated = [f for v in videos for f in v.frames if f.labels is not None]
    truth_row = {id(f): i for i, f in enumerate(annotated)}
    Y_all = split.multi_hot(annotated, ids, ignore_unknown=True)
    video_of = np.array([vi for vi, v in enumerate(videos) for f in v.frames if f.labels is not None])
    start = engine.knobs()
    base = {k: start[k] for k in ("mode", *PolicyKnobs.model_fields, "exit_thresholds")}
    settings = {name: {**base, **knobs} for name, knobs in points.items()}
    for s in settings.values():  # every point checked before minutes of streaming
        engine.set_knobs(**s)
    # a bundle with audio exits on a split with audio: each point with exits is also run hearing the audio,
    # recorded as "<name>+audio" beside the visual one (the same frames, the same engine, the same knobs)
    tracks = split.audio_tracks() if engine.mel is not None else {}
    heard = [f"{n}{AUDIO_SUFFIX}" for n, k in points.items() if k["mode"] != "full" and tracks]
    settings |= {h: settings[h.removesuffix(AUDIO_SUFFIX)] for h in heard}
    names = [*points, *heard]
    records = {
        n: _ModeRecord(settings[n]["mode"], knobs=dict(points[n.removesuffix(AUDIO_SUFFIX)])) for n in names
    }
    bar = _bar(budget * len(names), progress)
    try:
        _warm_up(engine, videos, [settings[n] for n in names])
        done = 0
        for vi, video in enumerate(videos):
            frames = video.frames[: budget - done]
            if not frames:
                break
            images = [_read(f) for f in frames]
            mels = _mels(engine, tracks, frames) if video.id in tracks else None
            order = names[vi % len(names) :] + names[: vi % len(names)]
            for n in order:
                audio = n.endswith(AUDIO_SUFFIX)
                if audio and mels is None:
                    continue  # a video without a sound track: the audio row skips it
                engine.set_knobs(**settings[n])
                _run_video(engine, frames, images, records[n], truth_row, meter, mels if audio else None)
                bar.update(len(frames))
            done += len(frames)
    finally:
        bar.close()
        engine.set_knobs(**base)
    used = sorted({r for rec in records.values() for r in rec.rows})
    report = {
        "bundle": engine.bundle_id,
        "data": str(split.root),
        "split": split.name,
        "frames": done,
        "annotated_frames": len(used),
        "videos": sum(1 for v in videos if v.frames),
        "map_definition": MAP_DEFINITION,
        "label_definition": LABEL_DEFINITION,
        "providers": engine.providers,
        "threads": engine.trunk.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "peak_rss_mb": _peak_rss_mb(),
        "modes": {n: _summarise(engine, rec, Y_all) for n, rec in records.items()},
    }
    full = report["modes"].get("full")
    for row in report["modes"].values():
        row["speedup_vs_full"] = (
            full["latency_ms"]["p50"] / row["latency_ms"]["p50"]
            if full and row["latency_ms"]["p50"]
            else None
        )
    if resamples:
        report["resamples"] = resamples
        add_intervals(report["modes"], records, Y_all, video_of, resamples)
    lat = {n: np.asarray(rec.latency) for n, rec in records.items()}
    return EvalResult(report, lat, {n: rec.decisions for n, rec in records.items()})


def _warm_up(engine: Engine, videos: list, settings: list[dict[str, Any]]) -> None:
    """A few untimed frames per point: ORT allocates its arenas on the first runs."""
    first = next((v.frames for v in videos if v.frames), ())
    images = [_read(f) for f in first[:WARMUP_FRAMES]]
    for knobs in settings:
        engine.set_knobs(**knobs)
        state = engine.new_state()
        for img in images:
            engine.infer(img, state)


def _mels(engine: Engine, tracks: dict[int, Any], frames: list[Frame]) -> np.ndarray:
    """(F, n_mels, frames) log-mel windows of a video's frames, as the daemon computes them (numpy)."""
    mel = engine.mel
    assert mel is not None
    return log_mel(split_windows(tracks, frames, mel.samples), mel)


def _run_video(
    engine: Engine,
    frames,
    images,
    rec: _ModeRecord,
    truth_row: dict[int, int],
    meter: Any = None,
    mels: np.ndarray | None = None,
) -> None:
    state = engine.new_state()  # the policy's memory never crosses videos
    for i, (f, img) in enumerate(zip(frames, images, strict=True)):
        if meter is not None:
            meter.sample()
        c0 = time.process_time_ns()
        r = engine.infer(img, state, None if mels is None else mels[i : i + 1])
        rec.cpu.append((time.process_time_ns() - c0) / 1e6)
        if meter is not None:
            rec.energy.append(meter.energy_mj(r.infer_t0_ns, r.infer_t1_ns))
        rec.decisions.append((r.exit, tuple(r.adapters)))
        if f.labels is not None and r.count is not None and f.count is not None:
            rec.counts.append((r.count, f.count))
        rec.latency.append(r.preprocess_ms + r.inference_ms)
        rec.preprocess.append(r.preprocess_ms)
        rec.overhead.append(r.overhead_ms)
        rec.ort.append(r.ort_ms)
        rec.gflops.append(r.gflops)
        rec.adapters.append(len(r.adapters))
        rec.exits[r.exit] += 1
        if f.labels is not None:
            rec.scores.append(r.probs.copy())
            rec.labels.append(r.labels)
            rec.answered.append(r.exit)
            rec.rows.append(truth_row[id(f)])
            rec.ann_adapters.append(len(r.adapters))
            rec.ann_chosen.append(list(r.adapters))


def _selection(engine: Engine, rec: _ModeRecord, Y_all: np.ndarray) -> dict[str, Any]:
    """On annotated frames that ran adapters: adapters per frame against the contexts the frame's true labels
    need (greedy cover by the bundle's contexts), and their ratio (the policy's overhead; 1 = tight).

    Also over every annotated frame the final classifier answered (``*_final_frame``: frames where the
    policy chose no adapter count as 0, so a selection cannot look tight by skipping frames), with the share
    of those frames' true labels that the chosen contexts hold (``label_coverage``: 1 = no label missed)."""
    out: dict[str, Any] = {}
    final = [i for i, e in enumerate(rec.answered) if e == "final"]
    if final and any(engine.contexts):
        slot = {cid: j for j, cid in enumerate(engine.context_ids)}
        truth = [np.flatnonzero(Y_all[rec.rows[i]]).tolist() for i in final]
        held = [
            set().union(*(engine.contexts[slot[c]] for c in rec.ann_chosen[i]))
            if rec.ann_chosen[i]
            else set()
            for i in final
        ]
        n_true = sum(map(len, truth))
        out = {
            "final_frames": len(final),
            "adapters_per_final_frame": float(np.mean([rec.ann_adapters[i] for i in final])),
            "true_contexts_per_final_frame": float(
                np.mean([len(greedy_cover(t, engine.contexts)) for t in truth])
            ),
            "label_coverage": sum(len(set(t) & h) for t, h in zip(truth, held, strict=True)) / n_true
            if n_true
            else None,
        }
    ran = [i for i, a in enumerate(rec.ann_adapters) if a > 0]
    if not ran:
        return {"adapters_per_tail_frame": None, "true_contexts_per_tail_frame": None} | out
    needed = [len(greedy_cover(np.flatnonzero(Y_all[rec.rows[i]]).tolist(), engine.contexts)) for i in ran]
    used = float(np.mean([rec.ann_adapters[i] for i in ran]))
    return {
        "adapters_per_tail_frame": used,
        "true_contexts_per_tail_frame": float(np.mean(needed)),
        "tail_frames": len(ran),
    } | out


def _summarise(engine: Engine, rec: _ModeRecord, Y_all: np.ndarray) -> dict[str, Any]:
    n = len(rec.latency)
    if rec.scores:
        mean_ap, per_class = mean_average_precision(Y_all[rec.rows], np.stack(rec.scores))
    else:
        mean_ap, per_class = float("nan"), np.full(len(engine.classes), np.nan)
    lat = np.asarray(rec.latency)
    keys = [*range(engine.num_exits), "final"]
    pred = np.zeros((len(rec.rows), len(engine.classes)), dtype=bool)
    for i, labels in enumerate(rec.labels):
        pred[i, labels] = True
    overall, by_exit = label_summary(pred, Y_all[rec.rows], rec.answered, keys)
    return {
        "mode": rec.mode,
        **({"knobs": rec.knobs} if set(rec.knobs) != {"mode"} else {}),
        "frames": n,
        "map": _num(mean_ap),
        **overall,
        "label_quality_by_exit": by_exit,
        "per_class_ap": {name: _num(ap) for name, ap in zip(engine.classes, per_class, strict=True)},
        "exit_rate": {str(k): rec.exits.get(k, 0) / n for k in keys},
        "adapters_per_frame": float(np.mean(rec.adapters)),
        **_selection(engine, rec, Y_all),
        **(
            {"count_mae": _num(count_mae(*map(np.array, zip(*rec.counts, strict=True))))}
            if rec.counts
            else {}
        ),
        "gflops_per_frame": _num(float(np.mean(rec.gflops))),
        "latency_ms": {
            "mean": float(lat.mean()),
            "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)),
        },
        "fps": 1000.0 / float(lat.mean()),
        "cpu_ms_per_frame": float(np.mean(rec.cpu)),
        "energy_mj_per_frame": _mean_known(rec.energy),
        "preprocess_ms_median": float(np.median(rec.preprocess)),
        "ort_ms_median": float(np.median(rec.ort)),
        "overhead_ms_median": float(np.median(rec.overhead)),
    }


def label_summary(
    pred: np.ndarray, Y: np.ndarray, answered: list[int | str], keys: list[int | str]
) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    """Label F1 and exact match of published label sets ``pred`` (F, K) against ``Y`` over all frames, and
    per exit in ``keys`` over the frames that exit answered (``answered``, one per frame); None: no frames."""
    overall = {k: _num(v) for k, v in label_quality(pred, Y).items()}
    by_exit = {}
    for k in keys:
        mask = np.array([a == k for a in answered], dtype=bool)
        q = label_quality(pred[mask], Y[mask])
        by_exit[str(k)] = {"annotated_frames": int(mask.sum()), **{m: _num(v) for m, v in q.items()}}
    return overall, by_exit


def add_intervals(
    rows: dict[str, dict[str, Any]],
    records: dict[str, _ModeRecord],
    Y_all: np.ndarray,
    video_of: np.ndarray,
    resamples: int,
) -> None:
    """Per mode, the 95 % interval of mAP and label F1 over ``resamples`` draws of whole videos
    (``video_resamples``), and of their difference from full on the same draws (paired: the same videos in
    each draw, so what both modes get wrong alike cancels). A test split too small to resolve the exit's
    tolerance shows here as an interval wider than the tolerance."""
    draws = video_resamples(video_of, resamples)
    n, k = Y_all.shape
    Y = Y_all.astype(bool)
    per: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, rec in records.items():
        if not rec.rows or not draws:
            continue
        S = np.zeros((n, k))
        S[rec.rows] = np.stack(rec.scores)
        L = np.zeros((n, k), dtype=bool)
        for r, labels in zip(rec.rows, rec.labels, strict=True):
            L[r, labels] = True
        seen = np.zeros(n, dtype=bool)
        seen[rec.rows] = True
        stats = []
        for d in draws:
            d = d[seen[d]]
            stats.append(
                (mean_average_precision(Y[d], S[d])[0], frame_f1(L[d], Y[d]).mean() if d.size else np.nan)
            )
        per[name] = (seen, np.array(stats))
    full = per.get("full")
    for name, (seen, st) in per.items():
        row = rows[name]
        row["map_ci95"], row["label_f1_ci95"] = percentile_interval(st[:, 0]), percentile_interval(st[:, 1])
        if full is None or name == "full" or not np.array_equal(seen, full[0]):
            continue
        for j, key in enumerate(("map", "label_f1")):
            a, b = row[key], rows["full"][key]
            row[f"{key}_vs_full"] = None if a is None or b is None else a - b
            row[f"{key}_vs_full_ci95"] = percentile_interval(st[:, j] - full[1][:, j])


def _mean_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


def _bar(total: int, enabled: bool) -> Any:
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc="eval", unit="frame")

    class _Null:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    return _Null()


def run_eval(
    args: argparse.Namespace,
    modes: list[str] | Callable[[dict[str, Any]], dict[str, dict[str, Any]]],
    meter: Any = None,
) -> EvalResult:
    """Load the engine and the split named by ``args`` and evaluate (shared by eval and bench). ``modes``:
    mode names, or a function of the engine's knobs that returns named points (``evaluate``)."""
    knobs = parse_knobs(getattr(args, "set", None) or [], "--set")
    first = modes[0] if isinstance(modes, list) else "polymorph"
    engine = load_engine(args.bundle, mode=first, threads=args.threads)
    try:
        if knobs:
            engine.set_knobs(**knobs)
        points = modes if isinstance(modes, list) else modes(engine.knobs())
        name, why = evaluation_split(args.data, args.split)
        print(f"evaluating split {name!r}: {why}", file=sys.stderr)
        split = load_split(args.data, name, include_unannotated=True)
        result = evaluate(
            engine, split, points, max_frames=args.max_frames, progress=True, meter=meter,
            resamples=getattr(args, "resamples", 0),
        )  # fmt: skip
    finally:
        engine.close()
    result.report["knobs"] = knobs
    result.report["split_reason"] = why
    return result


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def cli_eval(args: argparse.Namespace) -> int:
    modes = list(MODES) if args.mode == "all" else [args.mode]
    result = run_eval(args, modes)
    report = result.report
    print(format_table(report))
    if len(modes) == 1:
        aps = report["modes"][modes[0]]["per_class_ap"]
        print(
            "per-class AP: "
            + ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f}'}" for k, v in aps.items())
        )
    print(format_footer(report))
    if args.json:
        write_json(args.json, report)
        print(f"report written to {args.json}")
    return 0
