"""TorchScript vs dynamo ONNX exporter: every bundle graph of a run, exported both ways and timed in ORT.

    python bench/compare_exporters.py --run /work/runs/small [--out DIR] [--runs 50] [--threads 1] [--json OUT]

How ``export.onnx.DEFAULT_EXPORTER`` was chosen (docs/ARCHITECTURE.md, "Exporter"): median ms of interleaved
blocks at B=1 (M=2 for tail_lora), plus the seconds each export took. Needs the train extra and onnxscript.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from polymorphd.export.core.timing import interleaved_ms, session
from polymorphd.export.onnx import Exporter, export_graph
from polymorphd.export.plan import GraphSpec, plan_graphs
from polymorphd.models.train.run import Run, load_run

EXPORTERS: tuple[Exporter, ...] = ("torchscript", "dynamo")


def numpy_feeds(spec: GraphSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in spec.make_inputs(batch, torch.Generator().manual_seed(seed)).items()}


def compare_exporters(
    run: Run, out_dir: Path, *, runs: int = 50, blocks: int = 5, threads: int = 2
) -> dict[str, dict[str, float]]:
    """Export every graph with both exporters and time each in ORT (median of interleaved blocks, B=1, M=2).

    Returns graph -> {"<exporter>_ms": .., "<exporter>_export_s": ..}.
    """
    out: dict[str, dict[str, float]] = {}
    for spec in plan_graphs(run):
        row: dict[str, float] = {}
        sessions = {}
        for e in EXPORTERS:
            (out_dir / e).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            export_graph(spec, out_dir / e / spec.file, exporter=e)
            row[f"{e}_export_s"] = round(time.perf_counter() - t0, 2)
            sessions[e] = session(out_dir / e / spec.file, threads)
        feeds = numpy_feeds(spec, 2 if spec.name == "tail_lora" else 1)
        ms = interleaved_ms({e: (sessions[e], feeds) for e in EXPORTERS}, runs, blocks)
        out[spec.name] = {**row, **{f"{e}_ms": round(v, 4) for e, v in ms.items()}}
    return out


def table(result: dict[str, dict[str, float]]) -> str:
    lines = [
        "| graph | TorchScript ms | dynamo ms | export s (TS / dynamo) |",
        "|---|---|---|---|",
    ]
    for name, r in result.items():
        lines.append(
            f"| {name} | {r['torchscript_ms']:.3f} | {r['dynamo_ms']:.3f} | "
            f"{r['torchscript_export_s']} / {r['dynamo_export_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a training run directory")
    p.add_argument("--out", type=Path, default=None, help="keep the graphs here (default: a temporary dir)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per graph and exporter")
    p.add_argument("--blocks", type=int, default=5, help="interleaved blocks the runs are split into")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (docs: 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    run = load_run(args.run)
    with tempfile.TemporaryDirectory(prefix="polymorphd-exporters-") as tmp:
        out_dir = args.out or Path(tmp)
        result = compare_exporters(run, out_dir, runs=args.runs, blocks=args.blocks, threads=args.threads)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
