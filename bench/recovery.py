"""Camera recovery: how long after an unplugged camera comes back the daemon publishes labels again.

    python bench/recovery.py [--trials 12] [--json bench/results/recovery.json]

The daemon runs in this process with the real engine on the tiny bundle (bench/harness.py) and the default
reconnect backoff (``reconnect: {initial_s: 0.5, max_s: 1.0}``). The camera is the test suite's ``Unpluggable``
(tests/daemon/fakes.py: while out, opens fail and reads return nothing). Each trial pulls it out for a random
0.2-4 s, puts it back, and times the first label message of a frame read after the return (its ``pub_ts``
minus the moment of return). The promise in docs/RELIABILITY.md: under 2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from harness import ROOT, machine, tiny_bundles, write_result

from polymorphd.daemon.app import Daemon
from polymorphd.daemon.config import DaemonConfig
from polymorphd.daemon.power import Meter
from tests.daemon.fakes import Sub, Unpluggable


def recovery(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="polymorphd-recovery-"))
    bundle = tiny_bundles(Path(args.cache))["base"]
    cfg = DaemonConfig.model_validate(
        {"bundle": str(bundle), "pub": f"ipc://{work}/pub", "ctl": f"ipc://{work}/ctl", "threads": 1}
    )
    cam = Unpluggable()
    d = Daemon(cfg, opener=cam, meter=Meter())
    d.start()
    loop = threading.Thread(target=d.run, daemon=True)
    loop.start()
    rng = np.random.default_rng(0)
    out, times = [], []
    try:
        sub = Sub(d.publisher.address, "labels/")
        sub.recv(30)
        for _ in range(args.trials):
            cam.present.clear()
            time.sleep(0.3)
            while sub.sock.poll(0):
                sub.recv()
            time.sleep(float(rng.uniform(0.2, 4.0)))
            back = time.time_ns()
            cam.present.set()
            while True:
                _, p = sub.recv(30)
                if p["frame_ts"] > back:
                    break
            times.append((p["pub_ts"] - back) / 1e9)
            out.append({"resumed_s": round(times[-1], 3)})
        sub.close()
    finally:
        d.request_stop()
        loop.join(5)
        d.stop()
    t = np.asarray(times)
    return {
        "trials": out,
        "resume_s_median": round(float(np.median(t)), 3),
        "resume_s_max": round(float(t.max()), 3),
        "under_2s": bool(t.max() < 2.0),
        "reconnect": cfg.reconnect.model_dump(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument(
        "--cache", default=str(Path.home() / ".cache/polymorphd/bench-bundles"), help="tiny bundles"
    )
    p.add_argument("--json", default=str(ROOT / "bench/results/recovery.json"), help="where the result goes")
    args = p.parse_args(argv)
    info = {"machine": machine(), "command": "python bench/recovery.py " + " ".join(argv or sys.argv[1:])}
    result = recovery(args)
    write_result(Path(args.json), {**info, **result})
    print(json.dumps(result, indent=2))
    return 0 if result["under_2s"] else 1


if __name__ == "__main__":
    sys.exit(main())
