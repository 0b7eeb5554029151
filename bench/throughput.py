"""End-to-end daemon throughput against ``polymorphd eval`` on the same bundle, in one run.

The daemon (``polymorphd serve``, a subprocess, ``synthetic:`` source at unlimited rate) is measured from the
outside: label messages per second seen by a subscriber, and capture-to-publish latency (pub_ts - frame_ts of
each message). ``polymorphd eval`` (a subprocess too) gives the engine's own throughput on the dataset: 1000 /
mean(preprocess + inference) ms. The two alternate (eval, daemon, eval, daemon, ...) so machine noise hits
both; the table shows every round and the medians, then the ratio daemon / eval (target >= 0.9).

    .venv/bin/python bench/throughput.py                      # the first bundle found (see --bundle)
    .venv/bin/python bench/throughput.py --bundle /work/bundles/small --rounds 3 --seconds 15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from polymorphd.daemon.config import source_kind

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = (Path("/work/bundles/small"), Path("/work/bundles/base"))
RUNS = (Path("/work/runs/small"),)
CLI = [sys.executable, "-m", "polymorphd.daemon.cli"]


def find_bundle(given: str | None, workdir: Path) -> Path:
    """--bundle, else the first benchmark bundle present, else an export of a run (a tiny random one last)."""
    if given:
        return Path(given)
    for path in BUNDLES:
        if (path / "manifest.json").exists():
            return path
    from polymorphd.export.bundle import export_bundle  # needs the train extra, only for this fallback

    run = next((r for r in RUNS if (r / "config.json").exists()), None)
    if run is None:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_tiny_run

        run = make_tiny_run(workdir / "tiny")
        print(f"no bundle in {', '.join(map(str, BUNDLES))} and no run in {RUNS[0]}: using a tiny random run")
    return Path(export_bundle(run, workdir / f"{run.name}-bundle"))


def synthetic_uri(data: Path, split: str) -> str:
    """A synthetic: source drawing frames like the dataset's (its generator settings, if it recorded them)."""
    try:
        info = json.loads((data / "annotations" / f"{split}.json").read_text()).get("info", {})
        cfg = info["config"]
    except (OSError, ValueError, KeyError, AttributeError):
        return "synthetic:"
    keys = {"seed": "seed", "classes": "num_classes", "contexts": "num_contexts"}
    keys |= {"width": "width", "height": "height"}
    return "synthetic:?" + "&".join(f"{k}={cfg[v]}" for k, v in keys.items() if v in cfg)


def split_video(data: Path, split: str, out: Path) -> str:
    """The split's frames, in eval's order, as one MJPEG file: the daemon then sees exactly eval's frames."""
    import cv2

    from polymorphd.models.data.tao import load_split

    frames = [f for v in load_split(data, split, include_unannotated=True).videos for f in v.frames]
    first = cv2.imread(str(frames[0].path), cv2.IMREAD_COLOR)
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 30, (w, h))
    for f in frames:
        writer.write(cv2.resize(cv2.imread(str(f.path), cv2.IMREAD_COLOR), (w, h)))
    writer.release()
    return str(out)


def run_eval(args: argparse.Namespace, bundle: Path, out: Path) -> dict[str, Any]:
    cmd = [*CLI, "eval", "--bundle", str(bundle), "--data", args.data, "--split", args.split]
    cmd += ["--mode", args.mode, "--threads", str(args.threads), "--json", str(out)]
    if args.max_frames:
        cmd += ["--max-frames", str(args.max_frames)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"polymorphd eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(out.read_text())["modes"][args.mode]
    return {"fps": row["fps"], "frames": row["frames"], "p50_ms": row["latency_ms"]["p50"]}


def cpu_available(seconds: float = 1.0) -> float:
    """CPU seconds per second two busy threads of one process get now (2.0 on an idle 2-core machine)."""
    import hashlib
    import threading

    data, stop = b"x" * 1_000_000, time.monotonic() + seconds

    def burn() -> None:
        while time.monotonic() < stop:
            hashlib.sha256(data).digest()  # releases the GIL: both threads can run

    t0, c0 = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=burn) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.process_time() - c0) / (time.monotonic() - t0)


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_daemon(args: argparse.Namespace, bundle: Path, source: str, work: Path) -> dict[str, Any]:
    pub, ctl = f"ipc://{work}/pub", f"ipc://{work}/ctl"
    config = work / "serve.json"
    config.write_text(
        json.dumps(
            {
                "bundle": str(bundle),
                "source": source,
                "source_fps": 0,
                "loop": source_kind(source) == "file",
                "pub": pub,
                "ctl": ctl,
                "mode": args.mode,
                "threads": args.threads,
                "log_level": "WARNING",
            }
        )
    )
    log = (work / "daemon.log").open("wb")
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"labels/")
    sub.connect(pub)
    try:
        if not sub.poll(180_000):
            raise RuntimeError(f"no label within 180 s; see {work / 'daemon.log'}")
        end_warmup = time.monotonic() + args.warmup
        while time.monotonic() < end_warmup:
            sub.recv_multipart()
        msgs, cpu0 = [], _cpu_s(proc.pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            if sub.poll(1000):
                msgs.append(json.loads(sub.recv_multipart()[1]))
        cpu = _cpu_s(proc.pid) - cpu0
        stats = _request(ctx, ctl, {"cmd": "stats"})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        sub.close(0)
        ctx.term()
        log.close()
    seqs = [m["seq"] for m in msgs]
    span_s = (msgs[-1]["pub_ts"] - msgs[0]["pub_ts"]) / 1e9
    lat = np.array([(m["pub_ts"] - m["frame_ts"]) / 1e6 for m in msgs])
    return {
        "fps": (seqs[-1] - seqs[0]) / span_s,  # by seq: frames published, even those this subscriber lost
        "frames": len(msgs),
        "lost": seqs[-1] - seqs[0] + 1 - len(msgs),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "cpu_per_s": cpu / span_s,
        "source_fps": stats.get("source", {}).get("fps"),
        "inference_p50_ms": stats.get("latency_ms", {}).get("inference", {}).get("p50"),
        "exits": stats.get("exits"),
    }


def _request(ctx: zmq.Context, endpoint: str, req: dict[str, Any]) -> dict[str, Any]:
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_json(req)
        return sock.recv_json() if sock.poll(10_000) else {}
    finally:
        sock.close(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bundle", default=None, help=f"bundle (default: first of {', '.join(map(str, BUNDLES))})"
    )
    p.add_argument("--data", default="/work/data/synth", help="TAO dataset for eval")
    p.add_argument("--split", default="validation")
    p.add_argument("--mode", default="polymorph")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (both sides)")
    p.add_argument(
        "--source",
        default=None,
        help="daemon source URI (default: synthetic: like --data's generator); 'video': the split's frames "
        "as an MJPEG file, looped",
    )
    p.add_argument("--rounds", type=int, default=2, help="eval/daemon pairs, alternated")
    p.add_argument("--seconds", type=float, default=10.0, help="daemon measurement window per round")
    p.add_argument("--warmup", type=float, default=2.0, help="daemon seconds discarded before measuring")
    p.add_argument("--max-frames", type=int, default=None, help="eval: frames per round (default: the split)")
    p.add_argument("--json", default=None, help="write every round's numbers here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="polymorphd-throughput-") as tmp:
        work = Path(tmp)
        bundle = find_bundle(args.bundle, work)
        source = args.source or synthetic_uri(Path(args.data), args.split)
        if source == "video":
            source = split_video(Path(args.data), args.split, work / f"{args.split}.avi")
        print(f"bundle {bundle}, data {args.data} [{args.split}], source {source}, mode {args.mode}, "
              f"{args.threads} ORT threads, {os.cpu_count()} CPUs, {platform.machine()}")  # fmt: skip
        cpu_before = cpu_available()
        evals, daemons = [], []
        for r in range(args.rounds):
            evals.append(run_eval(args, bundle, work / f"eval{r}.json"))
            print(f"round {r + 1}: eval {evals[-1]['fps']:.1f} fps", end="", flush=True)
            (work / f"d{r}").mkdir()
            daemons.append(run_daemon(args, bundle, source, work / f"d{r}"))
            print(f", daemon {daemons[-1]['fps']:.1f} fps", flush=True)
        cpu_after = cpu_available()

    print()
    print("| round | eval fps | daemon fps | ratio | daemon p50 ms | p95 ms | daemon CPU s/s | source fps |")
    print("|---|---|---|---|---|---|---|---|")
    for r, (e, d) in enumerate(zip(evals, daemons, strict=True)):
        print(
            f"| {r + 1} | {e['fps']:.1f} | {d['fps']:.1f} | {d['fps'] / e['fps']:.2f} | {d['p50_ms']:.2f} | "
            f"{d['p95_ms']:.2f} | {d['cpu_per_s']:.2f} | {d['source_fps']} |"
        )
    eval_fps = statistics.median(e["fps"] for e in evals)
    daemon_fps = statistics.median(d["fps"] for d in daemons)
    ratio = daemon_fps / eval_fps
    p50 = statistics.median(d["p50_ms"] for d in daemons)
    p95 = statistics.median(d["p95_ms"] for d in daemons)
    print(
        f"| median | {eval_fps:.1f} | {daemon_fps:.1f} | **{ratio:.2f}** | {p50:.2f} | {p95:.2f} | | |\n\n"
        f"daemon / eval = {ratio:.2f} (target >= 0.9): {'met' if ratio >= 0.9 else 'MISSED'}\n"
        f"CPU two busy threads of one process got: {cpu_before:.2f} s/s before, {cpu_after:.2f} after "
        "(2.00 = two idle cores; below ~1.5 the daemon's capture thread cannot overlap inference)"
    )
    if args.json:
        out = {"bundle": str(bundle), "source": source, "args": vars(args), "eval": evals, "daemon": daemons}
        out["cpu_available"] = [cpu_before, cpu_after]
        Path(args.json).write_text(json.dumps({**out, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
