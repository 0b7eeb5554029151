"""Two ways to feed M context adapters to the LoRA tail, measured on a bundle.

(a) stacked: ``tail_lora.onnx`` takes the adapters' tensors stacked on axis 0 as ordinary graph inputs;
    one batched run serves all M adapters over the shared trunk tokens (what the engine does).
(b) ORT adapters: a single-adapter copy of the tail whose LoRA tensors and head are overridable initializers
    (declared inputs with default initializers), one ``onnxruntime.LoraAdapter`` per context made active
    with ``RunOptions.add_active_adapter``; M runs for M adapters. Per DESIGN.md's pitfalls the adapters
    are kept referenced and ``run`` (not iobinding) is used.

Both paths are checked to give the same probabilities before timing. Usage:

    python bench/lora_feeding.py BUNDLE [--runs 50] [--threads 2] [--max-m 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from polymorphd.export.core.manifest import load_manifest
from polymorphd.export.core.timing import session


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return {k: np.array(v.numpy(), dtype=np.float32) for k, v in params.items()}


def single_adapter_graph(tail_lora: Path, defaults: dict[str, np.ndarray], out: Path) -> None:
    """tail_lora.onnx with M fixed to 1 and every adapter tensor an overridable initializer (default: ``defaults``)."""
    model = onnx.load(str(tail_lora))
    for inp in model.graph.input:
        if inp.name in defaults:
            dims = inp.type.tensor_type.shape.dim
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
            model.graph.initializer.append(numpy_helper.from_array(defaults[inp.name], inp.name))
    for o in model.graph.output:
        o.type.tensor_type.shape.dim[0].ClearField("dim_param")
        o.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(out))


def _median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(bundle: Path, *, runs: int = 50, threads: int = 2, max_m: int = 3) -> dict[str, Any]:
    m = load_manifest(bundle)
    if m.kind != "full" or not m.tail_lora:
        sys.exit(f"error: {bundle} is not a full bundle with tail_lora.onnx")
    adapters = [read_tensors(bundle / a.file) for a in m.adapters]
    if len(adapters) < max_m:
        sys.exit(f"error: {bundle} has {len(adapters)} adapters; --max-m {max_m} needs that many")
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((1, m.model["num_tokens"], m.model["embed_dim"])).astype(np.float32)
    stacked = session(bundle / m.tail_lora, threads)
    with tempfile.TemporaryDirectory() as tmp:
        single_path = Path(tmp) / "tail_lora_single.onnx"
        single_adapter_graph(bundle / m.tail_lora, adapters[0], single_path)
        single = session(single_path, threads)
    # keep every LoraAdapter referenced for as long as its RunOptions is used (DESIGN.md pitfalls)
    lora = []
    for a in m.adapters:
        la = ort.LoraAdapter()
        la.Load(str(bundle / a.file))
        ro = ort.RunOptions()
        ro.add_active_adapter(la)
        lora.append((la, ro))
    rows: list[dict[str, Any]] = []
    for mm in range(1, max_m + 1):
        feed = {k: np.concatenate([adapters[j][k] for j in range(mm)]) for k in adapters[0]}
        feed["tokens"] = tokens
        want = stacked.run(None, feed)[0]
        got = np.concatenate([single.run(None, {"tokens": tokens}, lora[j][1])[0] for j in range(mm)])
        diff = float(np.max(np.abs(want - got)))
        if diff > 1e-4:
            sys.exit(f"error: the two paths disagree by {diff:.3g} for M={mm}; the adapter path is broken")

        def run_b(mm: int = mm) -> None:
            for j in range(mm):
                single.run(None, {"tokens": tokens}, lora[j][1])

        # interleave the two paths in blocks so background load hits both alike
        a_ms, b_ms = [], []
        for _ in range(5):
            a_ms.append(_median_ms(lambda feed=feed: stacked.run(None, feed), max(runs // 5, 10)))
            b_ms.append(_median_ms(run_b, max(runs // 5, 10)))
        rows.append(
            {
                "M": mm,
                "stacked_ms": statistics.median(a_ms),
                "ort_adapter_ms": statistics.median(b_ms),
                "max_diff": diff,
            }
        )
    return {"bundle": m.ident, "threads": threads, "runs": max(runs // 5, 10) * 5, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"LoRA feeding on {result['bundle']}: median ms over {result['runs']} runs, {result['threads']} threads",
        "| M | (a) stacked inputs, 1 run | (b) LoraAdapter, M runs | (b)/(a) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = r["ort_adapter_ms"] / r["stacked_ms"]
        lines.append(f"| {r['M']} | {r['stacked_ms']:.3f} | {r['ort_adapter_ms']:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--runs", type=int, default=50, help="timed runs per path and M (>= 50 for the docs)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (the board's)")
    p.add_argument("--max-m", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    result = measure(args.bundle, runs=args.runs, threads=args.threads, max_m=args.max_m)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
