"""The bundle's ONNX graphs as ONNX Runtime sessions: the shared trunk every engine of one base reuses.

Thin I/O shell: sessions, provider choice, and a timed ``run`` that adds the time spent inside ONNX Runtime to
a per-frame accumulator so the engine can report its own overhead separately. Torch-free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from polymorphd.models.core.errors import BundleError, ConfigError

log = logging.getLogger(__name__)


def choose_providers(requested: Sequence[str]) -> list[str]:
    """Requested providers that this ONNX Runtime build has, in order, always ending with CPU."""
    if isinstance(requested, str):
        requested = [requested]
    available = ort.get_available_providers()
    chosen = []
    for name in requested:
        if name in available:
            if name not in chosen:
                chosen.append(name)
        else:
            log.warning(
                "execution provider %s is not available in this onnxruntime build (available: %s); "
                "falling back to the next one (CPUExecutionProvider last)",
                name,
                ", ".join(available),
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(threads: int) -> ort.SessionOptions:
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # graphs are chains: no parallel branches to schedule
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Each session has its own intra-op pool and a frame runs 3-8 sessions back to back: a pool left
    # spin-waiting after its run steals the cores the next session needs (base shapes, 2 threads on 2 cores:
    # full path 48 ms spinning vs 8.5 ms not). A process-wide shared pool would avoid that but breaks every
    # other session in the process (ORT refuses per-session pools once a global one exists).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # ORT's own warnings go to stderr unformatted; errors still raise
    return opts


class Clock:
    """Per-frame accumulator of time spent inside ``session.run`` (ns); reset by the engine each frame."""

    __slots__ = ("ort_ns",)

    def __init__(self) -> None:
        self.ort_ns = 0


@dataclass
class Graph:
    """One session plus its fixed input/output names, so a frame builds no name lists."""

    file: str
    session: ort.InferenceSession
    inputs: list[str]
    outputs: list[str]
    input_shapes: dict[str, list[Any]]

    def run(self, feed: Mapping[str, np.ndarray], clock: Clock) -> np.ndarray:
        t0 = time.perf_counter_ns()
        out = self.session.run(self.outputs, feed)[0]
        clock.ort_ns += time.perf_counter_ns() - t0
        return out

    def run_all(self, feed: Mapping[str, np.ndarray], clock: Clock) -> list[np.ndarray]:
        """Every output, in ``outputs`` order (the audiovisual exits answer probs and count)."""
        t0 = time.perf_counter_ns()
        out = self.session.run(self.outputs, feed)
        clock.ort_ns += time.perf_counter_ns() - t0
        return out


def open_graph(
    root: Path,
    file: str,
    opts: ort.SessionOptions,
    providers: list[str],
    *,
    inputs: Sequence[str],
    output: str | None = "probs",
    outputs: Sequence[str] | None = None,
) -> Graph:
    """Open ``root/file``; the graph must have the ``inputs`` the bundle contract names and one output."""
    path = root / file
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph: {exc}") from exc
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in inputs if n not in names]
    if missing:
        raise BundleError(
            f"{path}: input(s) {missing} not found in graph inputs; valid input names are {names} "
            "(see docs/bundle.md; re-export the bundle)"
        )
    outs = [o.name for o in sess.get_outputs()]
    if outputs is not None:
        if outs != list(outputs):
            raise BundleError(
                f"{path}: expected outputs {list(outputs)}, the graph has {outs} (see docs/bundle.md)"
            )
        return Graph(file, sess, names, outs, {i.name: list(i.shape) for i in sess.get_inputs()})
    # ONNX forbids an output named like an input, so a later segment's output may be "tokens_out"
    if len(outs) != 1 or (output is not None and outs[0] != output):
        raise BundleError(
            f"{path}: expected one output{f' named {output!r}' if output else ''}, the graph has {outs} "
            "(see docs/bundle.md)"
        )
    return Graph(file, sess, names, outs, {i.name: list(i.shape) for i in sess.get_inputs()})


class Trunk:
    """Segments, exits and the three tails of one base bundle, opened once and shared by every Engine
    derived from it (adapter bundle swaps reuse it)."""

    def __init__(self, root: Path, manifest: dict[str, Any], providers: Sequence[str], threads: int) -> None:
        self.root = root
        self.base_sha256 = manifest["base_sha256"]
        self.providers = choose_providers(providers)
        self.threads = threads
        opts = session_options(threads)
        segs = manifest["segments"]
        self.segments = [
            open_graph(root, f, opts, self.providers, inputs=["image" if i == 0 else "tokens"], output=None)
            for i, f in enumerate(segs)
        ]
        self.exits = [
            open_graph(root, e["file"], opts, self.providers, inputs=["tokens"]) for e in manifest["exits"]
        ]
        self.tail = open_graph(root, manifest["tail"], opts, self.providers, inputs=["tokens"])
        self.tail_lora = open_graph(
            root, manifest["tail_lora"], opts, self.providers, inputs=["tokens", "head_w", "head_b"]
        )
        tw = manifest.get("tail_weights")
        self.tail_weights = (
            open_graph(root, tw, opts, self.providers, inputs=["tokens", "head_w", "head_b"]) if tw else None
        )
        audio = manifest.get("audio")
        # the audiovisual exits, one beside each visual exit (manifest checks the positions); [] without audio
        self.av_exits = [
            open_graph(
                root, e["file"], opts, self.providers, inputs=["tokens", "mel"], outputs=["probs", "count"]
            )
            for e in (audio["exits"] if audio else [])
        ]
        self.exit_after = _exit_positions(manifest)
        self.session_providers = self.segments[0].session.get_providers()
        log.info(
            "opened %d segments, %d exits and tails of %s with %s, %d intra-op threads",
            len(self.segments), len(self.exits), root, self.session_providers, threads,
        )  # fmt: skip


def _exit_positions(manifest: dict[str, Any]) -> list[int | None]:
    """For each segment, the index of the exit reading its output (None: no exit there)."""
    blocks = manifest.get("segment_blocks")
    segs = manifest["segments"]
    if not blocks or len(blocks) != len(segs):
        raise BundleError(
            f"manifest segment_blocks {blocks!r} must list one [start, end) pair per segment ({len(segs)} segments)"
        )
    ends = {int(b[1]): i for i, b in enumerate(blocks)}
    after: list[int | None] = [None] * len(segs)
    for j, e in enumerate(manifest["exits"]):
        i = ends.get(int(e["after_block"]))
        if i is None:
            raise BundleError(
                f"manifest exit {j} ({e['file']}) sits after block {e['after_block']}, which ends no segment "
                f"(segment_blocks {blocks}); re-export the bundle"
            )
        after[i] = j
    order = [j for j in after if j is not None]
    if order != sorted(order):
        raise BundleError(
            f"manifest exits are not in block order: {[e['after_block'] for e in manifest['exits']]}"
        )
    return after
