"""Soak: the daemon on ``synthetic:`` at full speed for 100,000 frames, hot swaps and rollbacks on the way.

    python bench/soak.py [--frames 100000] [--swap-every 10000] [--rollback-every 25000] [--json OUT]
    make soak

``polymorphd serve`` runs in a subprocess (1 ONNX Runtime thread) on the tiny bundle (bench/harness.py); one
subscriber in this process reads every label message (receive queue unbounded, so this side drops nothing).
Every ``swap_every`` published frames it hot-swaps an adapter bundle (alternately v2 and v3 of the same base),
every ``rollback_every`` it rolls back. Every 1,000 frames it samples the daemon's resident memory, threads and
open file descriptors from /proc. The warm-up ends at the first sample after the first hot swap (from then on
two engines are resident: the serving one and the previous one, kept for rollback).

Checks: RSS growth after warm-up <= 20 MB, threads and fds after warm-up constant, and every seq gap the
subscriber sees is a message the daemon counted as dropped (``publish_dropped`` in ``ctl stats``).
Exit status 0 when every check holds, 1 otherwise; the result goes to --json (bench/results/soak.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import zmq
from harness import ROOT, DaemonProc, machine, tiny_bundles, write_result

RSS_LIMIT_MB = 20.0


def soak(args: argparse.Namespace) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="polymorphd-soak-"))
    bundles = tiny_bundles(Path(args.cache))
    daemon = DaemonProc(work, bundles["base"])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 0  # unbounded: any gap is the daemon's, not this reader's
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"labels/")
    sub.connect(daemon.pub)
    samples, events = [], []
    received = gaps = 0
    last_seq = None
    swaps = rollbacks = 0
    warm_idx = None
    t0 = time.monotonic()
    try:
        daemon.wait_ready()
        next_sample = next_swap = next_rollback = 0
        while received < args.frames:
            if not sub.poll(30_000):
                raise RuntimeError(f"no label message for 30 s:\n{daemon.log_tail()}")
            _, payload = sub.recv_multipart()
            seq = json.loads(payload)["seq"]
            if last_seq is not None and seq > last_seq + 1:
                gaps += seq - last_seq - 1
            last_seq = seq
            received += 1
            # sampled before this frame's swap/rollback: a control connection still closing is not a leak
            if received >= next_sample:
                next_sample += 1000
                samples.append({"frame": received, "t_s": round(time.monotonic() - t0, 1), **daemon.stats()})
                if warm_idx is None and swaps >= 1:
                    warm_idx = len(samples) - 1
                if args.verbose:
                    print(samples[-1], file=sys.stderr)
            if received >= next_swap + args.swap_every:
                next_swap += args.swap_every
                target = bundles["adapters_a" if swaps % 2 == 0 else "adapters_b"]
                reply = daemon.request({"cmd": "load", "path": str(target)})
                swaps += 1
                events.append({"frame": received, "cmd": "load", "reply": reply})
                if not reply or not reply.get("ok"):
                    raise RuntimeError(f"hot swap at frame {received} failed: {reply}")
            if received >= next_rollback + args.rollback_every:
                next_rollback += args.rollback_every
                reply = daemon.request({"cmd": "rollback"})
                rollbacks += 1
                events.append({"frame": received, "cmd": "rollback", "reply": reply})
                if not reply or not reply.get("ok"):
                    raise RuntimeError(f"rollback at frame {received} failed: {reply}")
        stats = daemon.request({"cmd": "stats"})
    finally:
        sub.close(0)
        ctx.term()
        rc = daemon.stop()
    elapsed = time.monotonic() - t0
    after = samples[warm_idx:] if warm_idx is not None else samples
    rss0 = after[0]["rss_kb"]
    growth_mb = (max(s["rss_kb"] for s in after) - rss0) / 1024
    result = {
        "frames": received,
        "elapsed_s": round(elapsed, 1),
        "fps": round(received / elapsed, 1),
        "swaps": swaps,
        "rollbacks": rollbacks,
        "warmup_ends_at_frame": after[0]["frame"],
        "rss_mb_at_warmup": round(rss0 / 1024, 1),
        "rss_mb_final": round(samples[-1]["rss_kb"] / 1024, 1),
        "rss_growth_after_warmup_mb": round(growth_mb, 2),
        "rss_growth_from_frame_1000_mb": round(
            (samples[-1]["rss_kb"] - samples[min(1, len(samples) - 1)]["rss_kb"]) / 1024, 2
        ),
        "hwm_mb": round(max(s["hwm_kb"] for s in samples) / 1024, 1),
        "threads_after_warmup": sorted({s["threads"] for s in after}),
        "fds_after_warmup": sorted({s["fds"] for s in after}),
        "seq_gaps_seen": gaps,
        "publish_dropped": stats.get("publish_dropped") if stats else None,
        "capture_dropped": stats.get("dropped") if stats else None,
        "frame_errors": stats.get("frame_errors") if stats else None,
        "daemon_exit": rc,
    }
    result["checks"] = {
        "rss_growth_le_20mb": growth_mb <= RSS_LIMIT_MB,
        "threads_constant": len(result["threads_after_warmup"]) == 1,
        "fds_constant": len(result["fds_after_warmup"]) == 1,
        "gaps_all_counted": stats is not None and gaps <= stats["publish_dropped"],
        "clean_exit": rc == 0,
    }
    return {"result": result, "samples": samples, "events": events}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--swap-every", type=int, default=10_000)
    p.add_argument("--rollback-every", type=int, default=25_000)
    p.add_argument(
        "--cache", default=str(Path.home() / ".cache/polymorphd/bench-bundles"), help="tiny bundles"
    )
    p.add_argument("--work", default=None, help="daemon sockets and log (default: a new temp dir)")
    p.add_argument("--json", default=str(ROOT / "bench/results/soak.json"), help="where the result goes")
    p.add_argument("-v", "--verbose", action="store_true", help="print every sample to stderr")
    args = p.parse_args(argv)
    info = {"machine": machine(), "command": "python bench/soak.py " + " ".join(argv or sys.argv[1:])}
    out = soak(args)
    report = {**info, **out}
    write_result(Path(args.json), report)
    print(json.dumps(out["result"], indent=2))
    return 0 if all(out["result"]["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
