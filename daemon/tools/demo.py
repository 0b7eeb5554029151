"""``polymorphd demo``: the whole product on the embedded default, in one command.

1. Build a ``small`` bundle if none is cached: synthetic TAO dataset -> train -> export
   (needs the ``train`` extra; skipped when a verified bundle is already cached).
2. Serve it with the real daemon (a child process) on the built-in ``synthetic:`` camera.
3. Subscribe to the label stream and print each frame's labels beside the ground truth (both named
   from the bundle's manifest), with a running exact match and label F1, overall and per exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq

from polymorphd.daemon.publish import decode
from polymorphd.models.core.errors import BundleError, MissingExtraError, PolymorphError
from polymorphd.models.core.metrics import frame_f1

log = logging.getLogger(__name__)

DATA_SEED = 0  # the dataset's seed fixes its classes and context groups: the live camera must use the same
STREAM_SEED = 1000  # ...but show videos the model never trained on
READY_TIMEOUT_S = 120.0
# per process: ports are picked free, then bound by the child, so two demos on one machine could meet in between
CAMERA = f"demo-{os.getpid()}"


def cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polymorphd" / "demo"


def ensure_bundle(cache: Path, out: TextIO) -> Path:
    """The cached demo bundle, verified; built (synth -> train -> export) when missing or invalid."""
    from polymorphd.export.core.verify import verify_bundle

    bundle = cache / "bundle"
    if bundle.exists():
        try:
            verify_bundle(bundle)
            print(f"using the cached bundle {bundle}", file=out)
            return bundle
        except BundleError as exc:
            print(f"the cached bundle is unusable ({exc}); building a new one", file=out)
            _move_aside(bundle)
    try:
        from polymorphd.export.bundle import export_bundle
        from polymorphd.models.data.synth import SynthConfig, write_dataset
        from polymorphd.models.train.presets import get_preset
        from polymorphd.models.train.pretrain import resolve_init_from
        from polymorphd.models.train.train import train
    except ImportError as exc:
        raise MissingExtraError(
            f"no demo bundle is cached in {cache} and building one needs the training extra ({exc.name} is "
            "missing): pip install 'polymorphd[train]', or serve an existing bundle with polymorphd serve"
        ) from exc
    cache.mkdir(parents=True, exist_ok=True)
    data, run = cache / "data", cache / "run"
    if not (data / "annotations" / "train.json").exists():
        print(f"[1/3] writing the synthetic dataset to {data}", file=out)
        _move_aside(data)
        write_dataset(data, SynthConfig(seed=DATA_SEED))
    print(
        f"[2/3] training the small preset in {run} (a few minutes on 2 cores; resumes if interrupted)",
        file=out,
    )
    train(data, run, get_preset("small"), seed=0, init_from=resolve_init_from(None, "small"))
    print(f"[3/3] exporting the bundle to {bundle}", file=out)
    return export_bundle(run, bundle)


def _move_aside(path: Path) -> None:
    """Keep a broken cache entry for inspection instead of deleting it."""
    if path.exists():
        path.rename(path.with_name(f"{path.name}.broken-{int(time.time())}"))


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Accuracy:
    """Running quality of the published labels against the synthetic ground truth, defined as eval and the
    training report define it: mean per-frame label F1 and exact-match rate, overall and per answering exit."""

    frames: int = 0
    exact: int = 0
    f1_sum: float = 0.0
    exits: dict[str, int] = field(default_factory=dict)
    exit_f1_sum: dict[str, float] = field(default_factory=dict)
    adapters: int = 0

    def add(self, predicted: set[int], truth: set[int], exit_: Any, adapters: int) -> None:
        pred, true = np.zeros((2, 1, max(predicted | truth, default=0) + 1), dtype=bool)  # one frame each
        pred[0, list(predicted)] = True
        true[0, list(truth)] = True
        f1 = float(frame_f1(pred, true)[0])
        self.frames += 1
        self.exact += predicted == truth
        self.f1_sum += f1
        key = "final" if exit_ == "final" else f"exit{exit_}"
        self.exits[key] = self.exits.get(key, 0) + 1
        self.exit_f1_sum[key] = self.exit_f1_sum.get(key, 0.0) + f1
        self.adapters += adapters

    @property
    def f1(self) -> float:
        return self.f1_sum / max(self.frames, 1)

    def line(self) -> str:
        n = max(self.frames, 1)
        exits = ", ".join(
            f"{k} {v / n:.0%} (F1 {self.exit_f1_sum[k] / v:.3f})" for k, v in sorted(self.exits.items())
        )
        return (
            f"{self.frames} frames: exact match {self.exact / n:.1%}, label F1 {self.f1:.3f}, "
            f"adapters/frame {self.adapters / n:.2f}; {exits or 'no frames'}"
        )


def bundle_classes(bundle: Path) -> list[str]:
    """The bundle's class names, indexed as the label stream's ids (manifest ``classes``)."""
    from polymorphd.export.core.manifest import load_manifest

    return list(load_manifest(bundle).classes)


def names(ids: Any, classes: Sequence[str]) -> str:
    """Class names of ``ids`` from the bundle's manifest (never from the labels seen so far, which lack the
    classes the model has not predicted yet); ``#id`` for an id the bundle does not have."""
    return ", ".join(classes[i] if 0 <= i < len(classes) else f"#{i}" for i in sorted(map(int, ids))) or "-"


def frame_line(msg: dict[str, Any], predicted: set[int], truth: set[int], classes: Sequence[str]) -> str:
    mark = "ok" if predicted == truth else "  "
    return (
        f"{msg['seq']:6d} {mark} {msg.get('exit')!s:>5}  {msg['latency_ms']['inference']:5.1f} ms  "
        f"labels: {names(predicted, classes):40.40}  truth: {names(truth, classes):40.40}"
    )


def watch(
    endpoint: str,
    seconds: float | None,
    out: TextIO,
    proc: subprocess.Popen | None = None,
    classes: Sequence[str] = (),
    frames: int | None = None,
) -> Accuracy:
    """Print labels beside truth, named by the bundle's ``classes``, until ``seconds`` pass, ``frames`` frames
    are labelled, the daemon exits, or Ctrl-C."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.connect(endpoint)
    for topic in (
        f"labels/{CAMERA}",
        f"status/{CAMERA}",
    ):  # only our daemon's camera, never a stray publisher
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    acc, unknown = Accuracy(), set()
    started = time.monotonic()
    deadline = None
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                print(f"the daemon exited with code {proc.returncode}", file=out)
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if deadline is None and time.monotonic() - started > READY_TIMEOUT_S:
                raise PolymorphError(f"no label stream on {endpoint} within {READY_TIMEOUT_S:.0f} s")
            if not sock.poll(200):
                continue
            topic, payload = sock.recv_multipart()
            msg = decode(payload)
            if (
                deadline is None
            ):  # the clock starts with the first message: training/loading time is not demo time
                deadline = time.monotonic() + seconds if seconds else float("inf")
            if topic.startswith(b"status/"):
                continue
            predicted = {int(lab["id"]) for lab in msg.get("labels", [])}
            truth = {int(t) for t in msg.get("truth") or []}
            acc.add(predicted, truth, msg.get("exit"), len(msg.get("adapters") or []))
            stray = {i for i in truth if not 0 <= i < len(classes)} - unknown
            if stray:
                unknown |= stray
                print(
                    f"note: ground-truth class ids {', '.join(map(str, sorted(stray)))} are not among the "
                    f"bundle's {len(classes)} classes (shown as #id): the camera and the bundle disagree on "
                    "the dataset",
                    file=out,
                )
            print(frame_line(msg, predicted, truth, classes), file=out)
            if acc.frames % 30 == 0:
                print(f"  -- {acc.line()}", file=out)
            if frames is not None and acc.frames >= frames:
                break
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(0)
    return acc


def cli_demo(args: argparse.Namespace) -> int:
    out = sys.stdout
    cache = cache_dir(args.cache)
    bundle = ensure_bundle(cache, out)
    pub, ctl = free_tcp_endpoint(), free_tcp_endpoint()
    source = f"synthetic:?seed={DATA_SEED}&stream_seed={STREAM_SEED}"
    cmd = [sys.executable, "-m", "polymorphd.daemon.cli", "serve", "--bundle", str(bundle), "--source", source,
           "--pub", pub, "--ctl", ctl, "--camera", CAMERA, "--fps", str(args.fps)]  # fmt: skip
    print(f"serving {bundle} on {source} at {args.fps:g} fps", file=out)
    print(f"  label stream: polymorphd subscribe --endpoint {pub}", file=out)
    print(f"  control:      polymorphd ctl --endpoint {ctl} stats", file=out)
    proc = subprocess.Popen(cmd)
    try:
        acc = watch(pub, args.seconds, out, proc, bundle_classes(bundle), args.frames)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"demo finished: {acc.line()}", file=out)
    return 0 if acc.frames else 1
