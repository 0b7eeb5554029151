"""Shared by the benchmarks: for the reliability ones (bench/soak.py, bench/load.py) tiny bundles, a daemon
subprocess and /proc; for the per-seed model ones (bench/audio_exits.py, bench/avexits_recipe.py) their options.

The bundles are the test suite's tiny random run (``tests/conftest.py:make_tiny_run``: 32x32 input, 4 blocks,
2 exits, 3 adapters, 10 classes) exported once into a cache directory: a full bundle (v1) and two adapter
bundles for the same base (v2, v3). Exporting needs the ``train`` extra; serving them does not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests package is not installed; reuse its run builder, don't copy it
    sys.path.insert(0, str(ROOT))

# a stream whose classes match the tiny bundle's 10 (as tests/daemon/test_e2e.py serves it)
SYNTH = "synthetic:?classes=10&contexts=3&width=64&height=64"


def tiny_bundles(cache: Path) -> dict[str, Path]:
    """base (full, v1) and adapters_a / adapters_b (adapter bundles for that base, v2 and v3), cached."""
    out = {
        "base": cache / "tiny-v1",
        "adapters_a": cache / "tiny-adapters-v2",
        "adapters_b": cache / "tiny-adapters-v3",
    }
    if all((p / "manifest.json").is_file() for p in out.values()):
        return out
    from polymorphd.export.bundle import export_bundle
    from tests.conftest import make_tiny_run

    cache.mkdir(parents=True, exist_ok=True)
    run = cache / "run"
    if not (run / "config.json").exists():
        make_tiny_run(run)
    for key, kw in (
        ("base", {}),
        ("adapters_a", {"adapters_only": True, "version": 2}),
        ("adapters_b", {"adapters_only": True, "version": 3}),
    ):
        if not (out[key] / "manifest.json").is_file():
            export_bundle(run, out[key], bench_runs=1, progress=False, **kw)
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def proc_stats(pid: int) -> dict[str, int]:
    """Resident memory and its high-water mark (KiB), threads and open file descriptors of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    return {
        "rss_kb": fields["VmRSS"],
        "hwm_kb": fields["VmHWM"],
        "threads": fields["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class DaemonProc:
    """``polymorphd serve`` in a subprocess on ipc:// endpoints under ``work``; its log goes to work/daemon.log."""

    def __init__(
        self, work: Path, bundle: Path, source: str = SYNTH, *, threads: int = 1, fps: float = 0
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.pub, self.ctl = f"ipc://{work}/pub", f"ipc://{work}/ctl"
        config = work / "serve.yaml"
        config.write_text(f"threads: {threads}\nwarmup_runs: 1\nheartbeat_s: 1.0\n")
        self.log_path = work / "daemon.log"
        self._log = self.log_path.open("wb")
        argv = [
            sys.executable, "-m", "polymorphd.daemon.cli", "serve", "--config", str(config),
            "--bundle", str(bundle), "--source", source, "--pub", self.pub, "--ctl", self.ctl,
            "--fps", str(fps),
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            reply = self.request({"cmd": "status"}, 1.0)
            if reply and reply.get("ok") and reply.get("state") == "running":
                return reply
        raise RuntimeError(f"daemon not ready within {timeout} s:\n{self.log_tail()}")

    def request(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any] | None:
        from polymorphd.daemon.control import request

        return request(self.ctl, req, timeout)

    def stats(self) -> dict[str, int]:
        return proc_stats(self.pid)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def add_seed_runs(ap: argparse.ArgumentParser, *, merge_help: str) -> None:
    """The options of a bench that trains on finished runs, one per seed: --runs, --data, --first-seed, --merge."""
    ap.add_argument("--runs", nargs="+", default=[], help="finished run directories, one per seed")
    ap.add_argument("--data", default=None, help="a dataset from 'polymorphd data synth --audio'")
    ap.add_argument("--first-seed", type=int, default=0, help="seed of the first run (the others follow)")
    ap.add_argument("--merge", nargs="+", default=None, help=merge_help)


def check_seed_runs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error unless the bench has runs and data to work on, or files to merge."""
    if not args.merge and not (args.runs and args.data):
        ap.error("--runs and --data are required unless --merge is given")


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
