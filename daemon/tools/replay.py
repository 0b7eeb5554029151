"""Real-size latency for ``polymorphd bench``: replay recorded per-frame decisions on real-size bundles.

A trained bundle decides per frame which exit answers and which context adapters run; ``polymorphd eval``
records those decisions (``EvalResult.decisions``). The real-size bundles (``export/realsize.py``: DeiT-Tiny
geometry, random weights, the trained bundle's classes and contexts) cannot make those decisions themselves
(their scores are noise), so each frame is forced to the recorded one: the exits before the answering exit
are set never to decide and the answering exit always to (lo = hi = 1), and the context policy returns the
recorded contexts. Everything else is the engine's own path (preprocess, segments, exits, tails, merge), so the
timings are the engine's at that size. ``plain.onnx`` (the whole generalist in one graph) is timed beside it,
on the same preprocessed frames, to show what cutting the model into segments costs. Points are interleaved in
chunks (the order rotating) so machine noise falls on all alike. Torch-free.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from polymorphd.daemon.engine import Engine, load_engine
from polymorphd.daemon.graphs import session_options
from polymorphd.models.core.errors import BundleError
from polymorphd.models.core.preprocess import preprocess

log = logging.getLogger(__name__)

Decision = tuple[int | str, tuple[int, ...]]  # (answering exit or "final", context ids run)
PLAIN = "plain"  # the name of the plain-forward row
CHUNK = 5  # frames per point before the next point runs: short, so load bursts on the shared machine hit all


class _Replay:
    """A context policy that returns the recorded contexts (set per frame) and merges like the real one."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.chosen: list[int] = []

    def select(self, state: Any, exit_probs: np.ndarray) -> list[int]:
        return list(self.chosen)

    def __getattr__(self, name: str) -> Any:  # new_state, merge, observe, cfg: the real policy's
        return getattr(self.policy, name)


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty when unreadable, e.g. not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def precision_support(flags: set[str]) -> dict[str, str]:
    """What the CPU offers for each reduced precision (the real-size table's note)."""
    return {
        "int8": "VNNI (avx512_vnni/avx_vnni)" if flags & {"avx512_vnni", "avx_vnni"} else "no VNNI",
        "fp16": "avx512_fp16" if "avx512_fp16" in flags else "no avx512_fp16 (no native fp16 arithmetic)",
        "bf16": "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16",
    }


class _Point:
    def __init__(self, engine: Engine, mode: str, decisions: Sequence[Decision]) -> None:
        self.engine, self.mode, self.decisions = engine, mode, list(decisions)
        self.ids = {c: i for i, c in enumerate(engine.context_ids)}
        self.reset()

    def reset(self) -> None:
        self.latency: list[float] = []
        self.infer: list[float] = []  # inference only (no preprocess): what the plain forward compares with
        self.cpu: list[float] = []
        self.followed = 0  # frames whose (exit, contexts) came out as recorded: the replay's own check
        self.i = 0


def sample_blocks(decisions: Sequence[Decision], frames: int, block: int = CHUNK) -> list[Decision]:
    """``frames`` of the recorded stream in runs of ``block`` consecutive frames spread evenly over it: a short
    replay sees every part of the stream, and within a run the active set persists as it did (merged pays a
    merge only when the set changes)."""
    n = len(decisions)
    if frames >= n:
        return list(decisions)
    runs = -(-frames // block)
    starts = np.linspace(0, n - block, runs).round().astype(int) if n > block else np.zeros(1, dtype=int)
    out = [d for s in starts for d in decisions[s : s + block]]
    return out[:frames]


def replay(
    root: str | Path,
    points: dict[str, tuple[str, Sequence[Decision]]],
    images: Sequence[np.ndarray],
    *,
    threads: int = 2,
    frames: int = 120,
    progress: Any = None,
) -> dict[str, Any]:
    """Replay ``points`` ({name: (mode, decisions)}) on the real-size bundle ``root``, plus the plain
    forward (``root``/../plain*.onnx named by realsize.json); p50/p95 ms and CPU ms per frame per point."""
    root = Path(root)
    engines: list[Engine] = []
    rows: dict[str, _Point] = {}
    try:
        for name, (mode, decisions) in points.items():
            if not decisions:
                raise BundleError(f"point {name!r} has no recorded decisions to replay")
            e = load_engine(root, mode=mode, threads=threads)
            engines.append(e)
            e._pipe.policy = _Replay(e._pipe.policy)  # the recorded contexts, not the random model's
            rows[name] = _Point(e, mode, sample_blocks(decisions, frames))
        plain = _plain_session(root, threads)
        spec = engines[0].spec if engines else None
        x_plain = [preprocess(img, spec) for img in images[: max(1, min(len(images), 16))]] if spec else []
        plain_ms: list[float] = []
        plain_cpu: list[float] = []
        order = list(rows) + ([PLAIN] if plain is not None else [])
        for n in order:  # warm-up: ORT allocates on the first runs
            for _ in range(2):
                _one(rows[n], images) if n != PLAIN else _run_plain(plain, x_plain, 0)
        for p in rows.values():
            p.reset()
        done = 0
        r = 0
        while done < frames:
            chunk = min(CHUNK, frames - done)
            rot = order[r % len(order) :] + order[: r % len(order)]
            for n in rot:
                for _ in range(chunk):
                    if n == PLAIN:
                        ms, cpu = _run_plain(plain, x_plain, len(plain_ms))
                        plain_ms.append(ms)
                        plain_cpu.append(cpu)
                    else:
                        _one(rows[n], images)
                if progress is not None:
                    progress.update(chunk)
            done += chunk
            r += 1
        out: dict[str, Any] = {}
        for n, p in rows.items():
            out[n] = _stats(p.latency, p.cpu) | {
                "mode": p.mode,
                "inference_p50_ms": float(np.median(p.infer)),
                "followed": p.followed / len(p.latency),
            }
        if plain is not None:
            out[PLAIN] = _stats(plain_ms, plain_cpu) | {
                "mode": "plain ORT forward (one graph, no preprocess)",
                "inference_p50_ms": float(np.median(plain_ms)),
            }
        return out
    finally:
        for e in engines:
            e.close()


def _one(p: _Point, images: Sequence[np.ndarray]) -> float:
    """One frame of point ``p`` forced to its next recorded decision; returns preprocess + inference ms."""
    exit_, ctx = p.decisions[p.i % len(p.decisions)]
    img = images[p.i % len(images)]
    p.i += 1
    e = p.engine
    pipe = e._pipe
    n = e.num_exits
    lo, hi = np.zeros(n), np.ones(n)  # lo=0, hi=1: an exit never decides
    if exit_ != "final":
        lo[int(exit_)] = 1.0  # every probability < 1: the exit decides
    pipe.lo, pipe.hi = lo, hi
    pipe.policy.chosen = [p.ids[c] for c in ctx]
    c0 = time.process_time_ns()
    r = e.infer(img, e.new_state())
    p.cpu.append((time.process_time_ns() - c0) / 1e6)
    ms = r.preprocess_ms + r.inference_ms
    p.latency.append(ms)
    p.infer.append(r.inference_ms)
    p.followed += (r.exit, tuple(r.adapters)) == (exit_, tuple(ctx))
    return ms


def _plain_session(root: Path, threads: int) -> ort.InferenceSession | None:
    info_file = root.parent / "realsize.json"
    if not info_file.exists():
        return None
    info = json.loads(info_file.read_text())
    prec = root.name  # fp32 / int8 / fp16
    file = info.get("plain", {}).get(prec)
    if not file:
        return None
    return ort.InferenceSession(
        str(root.parent / file), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


def _run_plain(sess: ort.InferenceSession, xs: list[np.ndarray], i: int) -> tuple[float, float]:
    x = xs[i % len(xs)]
    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
    sess.run(None, {"image": x})
    return (time.perf_counter_ns() - t0) / 1e6, (time.process_time_ns() - c0) / 1e6


def _stats(ms: list[float], cpu: list[float]) -> dict[str, Any]:
    a = np.asarray(ms)
    return {
        "frames": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "cpu_ms_per_frame": float(np.mean(cpu)) if cpu else None,
        # process CPU time is less moved by other tenants than wall time: the load-robust cross-check
        "cpu_p50_ms": float(np.median(cpu)) if cpu else None,
    }
