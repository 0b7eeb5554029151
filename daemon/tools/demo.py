"""``polymorphd demo``: the whole product on the embedded default, in one command.

1. Build a ``small`` bundle if none is cached: synthetic TAO dataset -> train -> export
   (needs the ``train`` extra; skipped when a verified bundle is already cached).
2. Serve it with the real daemon (a child process) on the built-in ``synthetic:`` camera.
3. Subscribe to the label stream and print each frame's labels beside the ground truth,
   with a running accuracy.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import zmq

from polymorphd.daemon.publish import decode
from polymorphd.models.core.errors import BundleError, MissingExtraError, PolymorphError

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
    """Running accuracy of published labels against the synthetic ground truth."""

    frames: int = 0
    exact: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    adapters: int = 0

    def add(self, predicted: set[int], truth: set[int], exit_: Any, adapters: int) -> None:
        self.frames += 1
        self.exact += predicted == truth
        self.tp += len(predicted & truth)
        self.fp += len(predicted - truth)
        self.fn += len(truth - predicted)
        key = "final" if exit_ == "final" else f"exit{exit_}"
        self.exits[key] = self.exits.get(key, 0) + 1
        self.adapters += adapters

    @property
    def f1(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    def line(self) -> str:
        n = max(self.frames, 1)
        exits = " ".join(f"{k} {v / n:.0%}" for k, v in sorted(self.exits.items()))
        return (
            f"{self.frames} frames: exact match {self.exact / n:.1%}, label F1 {self.f1:.3f}, "
            f"adapters/frame {self.adapters / n:.2f}, {exits}"
        )


def _names(ids: Any, classes: dict[int, str]) -> str:
    return ", ".join(classes.get(int(i), str(i)) for i in sorted(ids)) or "-"


def watch(
    endpoint: str, seconds: float | None, out: TextIO, proc: subprocess.Popen | None = None
) -> Accuracy:
    """Print labels beside truth until ``seconds`` pass, the daemon exits, or Ctrl-C."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.connect(endpoint)
    for topic in (
        f"labels/{CAMERA}",
        f"status/{CAMERA}",
    ):  # only our daemon's camera, never a stray publisher
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    acc, classes = Accuracy(), {}
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
            classes.update({int(lab["id"]): lab["name"] for lab in msg.get("labels", [])})
            predicted = {int(lab["id"]) for lab in msg.get("labels", [])}
            truth = set(msg.get("truth") or [])
            acc.add(predicted, truth, msg.get("exit"), len(msg.get("adapters") or []))
            mark = "ok" if predicted == truth else "  "
            print(
                f"{msg['seq']:6d} {mark} {msg.get('exit')!s:>5}  {msg['latency_ms']['inference']:5.1f} ms  "
                f"labels: {_names(predicted, classes):40.40}  truth: {_names(truth, classes):40.40}",
                file=out,
            )
            if acc.frames % 30 == 0:
                print(f"  -- {acc.line()}", file=out)
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
        acc = watch(pub, args.seconds, out, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"demo finished: {acc.line()}", file=out)
    return 0 if acc.frames else 1
