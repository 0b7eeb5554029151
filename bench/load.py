"""Load: the label stream with 50 subscribers, 10 of them stalled (never reading), against none, in one run.

    python bench/load.py [--fps 100] [--phase-s 20] [--json bench/results/load.json]

``polymorphd serve`` runs in a subprocess (1 ONNX Runtime thread, the tiny bundle of bench/harness.py) on
``synthetic:`` at a fixed source rate. One measuring subscriber reads every message throughout. Four phases
of --phase-s seconds each: alone (A), with 40 reading subscribers (B0), with 10 stalled ones added (B: they only
connect and subscribe), alone again after all left (C). Per phase: the label rate the measuring subscriber
receives, the frame latency (capture to publish, ``latency_ms.total`` in each message, and capture to receipt),
seq gaps, and the daemon's resident memory and its high-water mark (/proc). The 40 readers share one thread
in this process and decode nothing, so B costs the daemon what 50 sockets cost, not what 50 parsers cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from harness import ROOT, DaemonProc, machine, tiny_bundles, write_result


def _phase(
    name: str,
    daemon: DaemonProc,
    meas: zmq.Socket,
    readers: list[zmq.Socket],
    seconds: float,
    stalled: int = 0,
) -> dict:
    poller = zmq.Poller()
    poller.register(meas, zmq.POLLIN)
    for r in readers:
        poller.register(r, zmq.POLLIN)
    for sock in (meas, *readers):  # what queued before this phase is not this phase's
        while sock.poll(0):
            sock.recv_multipart()
    stats0 = daemon.request({"cmd": "stats"}) or {}
    pub_lat, e2e_lat, seqs, read_by_others = [], [], [], 0
    mem_hwm, rss = 0, []
    t_end = time.monotonic() + seconds
    next_mem = 0.0
    while (now := time.monotonic()) < t_end:
        if now >= next_mem:
            s = daemon.stats()
            rss.append(s["rss_kb"])
            mem_hwm = max(mem_hwm, s["hwm_kb"])
            next_mem = now + 0.5
        for sock, _ in poller.poll(100):
            if sock is meas:
                _, payload = meas.recv_multipart()
                t_recv = time.time_ns()
                p = json.loads(payload)
                seqs.append(p["seq"])
                pub_lat.append(p["latency_ms"]["total"])
                e2e_lat.append((t_recv - p["frame_ts"]) / 1e6)
            else:
                while True:
                    try:
                        sock.recv_multipart(zmq.NOBLOCK)
                        read_by_others += 1
                    except zmq.Again:
                        break
    stats1 = daemon.request({"cmd": "stats"}) or {}
    seqs_a = np.asarray(seqs)
    gaps = int(np.sum(np.diff(seqs_a) - 1)) if len(seqs_a) > 1 else 0
    return {
        "phase": name,
        "subscribers": 1 + len(readers) + stalled,
        "stalled": stalled,
        "seconds": seconds,
        "label_rate_hz": round(len(seqs) / seconds, 1),
        "daemon_fps": stats1.get("fps"),
        "latency_total_ms_p50": round(float(np.percentile(pub_lat, 50)), 2),
        "latency_total_ms_p95": round(float(np.percentile(pub_lat, 95)), 2),
        "capture_to_receipt_ms_p50": round(float(np.percentile(e2e_lat, 50)), 2),
        "capture_to_receipt_ms_p95": round(float(np.percentile(e2e_lat, 95)), 2),
        "seq_gaps": gaps,
        "frames": stats1.get("frames", 0) - stats0.get("frames", 0),
        "capture_dropped": stats1.get("dropped", 0) - stats0.get("dropped", 0),
        "read_by_other_readers": read_by_others,
        "rss_mb_max": round(max(rss) / 1024, 1),
        "hwm_mb": round(mem_hwm / 1024, 1),
    }


def load(args: argparse.Namespace) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="polymorphd-load-"))
    bundles = tiny_bundles(Path(args.cache))
    daemon = DaemonProc(work, bundles["base"], fps=args.fps)
    ctx = zmq.Context()

    def sub(read: bool = True) -> zmq.Socket:
        s = ctx.socket(zmq.SUB)
        s.linger = 0
        s.setsockopt(zmq.SUBSCRIBE, b"labels/")
        s.connect(daemon.pub)
        return s

    phases = []
    try:
        daemon.wait_ready()
        meas = sub()
        meas.rcvhwm = 0  # the measuring reader never loses a message itself
        time.sleep(5.0)  # warm-up: joined, rate settled
        phases.append(_phase("A: 1 subscriber", daemon, meas, [], args.phase_s))
        readers = [sub() for _ in range(40)]
        phases.append(_phase("B0: +40 reading", daemon, meas, readers, args.phase_s))
        stalled = [sub() for _ in range(10)]  # connected and subscribed, never read
        phases.append(
            _phase("B: +40 reading, +10 stalled", daemon, meas, readers, args.phase_s, len(stalled))
        )
        for s in readers + stalled:
            s.close(0)
        phases.append(_phase("C: 1 subscriber again", daemon, meas, [], args.phase_s))
        final = daemon.request({"cmd": "stats"}) or {}
        meas.close(0)
    finally:
        ctx.destroy(linger=0)
        rc = daemon.stop()
    a, b0, b, c = phases
    ref_rate = (a["label_rate_hz"] + c["label_rate_hz"]) / 2
    ref_lat = (a["latency_total_ms_p50"] + c["latency_total_ms_p50"]) / 2
    return {
        "fps": args.fps,
        "phases": phases,
        # all 50 against none (A and C averaged), and the 10 stalled ones alone (B against B0)
        "rate_ratio_50_vs_none": round(b["label_rate_hz"] / ref_rate, 3),
        "latency_p50_ratio_50_vs_none": round(b["latency_total_ms_p50"] / ref_lat, 3),
        "rate_ratio_stalled": round(b["label_rate_hz"] / b0["label_rate_hz"], 3),
        "latency_p50_ratio_stalled": round(b["latency_total_ms_p50"] / b0["latency_total_ms_p50"], 3),
        "noise_rate_a_vs_c": round(a["label_rate_hz"] / c["label_rate_hz"], 3),
        "noise_latency_p50_a_vs_c": round(a["latency_total_ms_p50"] / c["latency_total_ms_p50"], 3),
        "publish_dropped_total": final.get("publish_dropped"),
        "daemon_exit": rc,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fps", type=float, default=100.0, help="source rate (0: as fast as the engine goes)")
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    p.add_argument(
        "--cache", default=str(Path.home() / ".cache/polymorphd/bench-bundles"), help="tiny bundles"
    )
    p.add_argument("--work", default=None, help="daemon sockets and log (default: a new temp dir)")
    p.add_argument("--json", default=str(ROOT / "bench/results/load.json"), help="where the result goes")
    args = p.parse_args(argv)
    info = {"machine": machine(), "command": "python bench/load.py " + " ".join(argv or sys.argv[1:])}
    result = load(args)
    write_result(Path(args.json), {**info, **result})
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
