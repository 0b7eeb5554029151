"""Post-export precision changes and what they cost: dynamic int8 (CPU) and float16 (GPU boards).

int8: ONNX Runtime's dynamic quantization, restricted to MatMul/Gemm nodes whose weight is an initializer,
so activations x activations (attention) and the LoRA inputs of tail_lora stay fp32. fp16:
``convert_float_to_float16(keep_io_types=True)``, so every graph keeps float32 inputs and outputs and the
engine feeds it unchanged. ``compare`` measures fp32 vs converted: ORT latency per graph and the mAP of the
full path (segments + generalist tail) on the run's dataset.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

from polymorphd.export.core.manifest import Manifest
from polymorphd.export.core.timing import interleaved_ms, random_feeds, session
from polymorphd.export.core.verify import expected_graphs
from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec, preprocess_batch
from polymorphd.models.data.tao import available_splits, load_images, load_split

log = logging.getLogger(__name__)

Quantize = Literal["int8"]
MAX_EVAL_FRAMES = 512  # enough frames for a stable mAP difference; keeps export in seconds
EVAL_BATCH = 32


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes whose second input is a stored weight (initializer): the ones worth quantizing."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def quantize_int8(src: Path, dst: Path) -> int:
    """Dynamic int8 weights for ``weight_matmuls``; copies the graph unchanged when it has none. Returns the count."""
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):  # the quantizer selects nodes by name
        node.name = node.name or f"{node.op_type}_{i}"
    nodes = weight_matmuls(model)
    if not nodes:  # e.g. tail_weights: every weight is an input; an empty list would mean "all" to ORT
        onnx.save(model, str(dst))
        return 0
    # ORT's quantizer first rewrites Gemm as MatMul + Add, renaming the node "<name>_MatMul"
    renamed = [f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm" and n.name in nodes]
    quantize_dynamic(
        model,
        str(dst),
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=nodes + renamed,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    return len(nodes)


def to_fp16(src: Path, dst: Path) -> None:
    """float16 weights and compute, float32 inputs/outputs (keep_io_types)."""
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def convert_graph(src: Path, dst: Path, *, quantize: Quantize | None, fp16: bool) -> None:
    if quantize and fp16:
        raise ConfigError("choose either --quantize int8 (CPU) or --fp16 (GPU), not both")
    if quantize == "int8":
        quantize_int8(src, dst)
    elif quantize is not None:
        raise ConfigError(f"quantize {quantize!r} invalid: choose 'int8'")
    elif fp16:
        to_fp16(src, dst)
    else:
        raise ConfigError("convert_graph needs quantize='int8' or fp16=True")


def compare(
    manifest: Manifest,
    fp32_dir: Path,
    conv_dir: Path,
    *,
    label: str,
    data: str | None,
    runs: int = 50,
    threads: int = 2,
    max_frames: int = MAX_EVAL_FRAMES,
) -> dict[str, Any]:
    """fp32 vs converted graphs: per-graph median latency and output drift, full-path latency and mAP."""
    graphs: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for file, (ins, _) in expected_graphs(manifest).items():
        feeds = random_feeds(ins, rng)
        a, b = session(fp32_dir / file, threads), session(conv_dir / file, threads)
        drift = float(np.max(np.abs(a.run(None, feeds)[0] - b.run(None, feeds)[0])))
        ms = interleaved_ms({"fp32": (a, feeds), label: (b, feeds)}, runs)
        t32, tq = ms["fp32"], ms[label]
        graphs[file] = {
            "fp32_ms": round(t32, 4),
            f"{label}_ms": round(tq, 4),
            "speedup": round(t32 / tq, 3),
            "max_abs_diff": drift,
        }
    path = [*manifest.segments, manifest.tail]
    full32 = sum(graphs[f]["fp32_ms"] for f in path)
    fullq = sum(graphs[f][f"{label}_ms"] for f in path)
    report: dict[str, Any] = {
        "mode": label,
        "threads": threads,
        "runs": runs,
        "graphs": graphs,
        "full_path_ms": {
            "fp32": round(full32, 4),
            label: round(fullq, 4),
            "speedup": round(full32 / fullq, 3),
        },
    }
    report["map"] = _map_change(manifest, fp32_dir, conv_dir, label, data, threads, max_frames)
    return report


def _map_change(
    m: Manifest, fp32_dir: Path, conv_dir: Path, label: str, data: str | None, threads: int, max_frames: int
) -> dict[str, Any]:
    if not data:
        return {"note": "config.json names no dataset ('data'/'dataset'): mAP change not measured"}
    root = Path(data)
    splits = available_splits(root) if root.is_dir() else []
    split = next((s for s in ("test", "validation") if s in splits), None)
    if split is None:
        return {
            "note": f"dataset {root} has no test or validation split (found {splits}): mAP change not measured"
        }
    try:
        loaded = load_split(root, split)
        frames = loaded.annotated_frames()
        if len(frames) > max_frames:  # evenly spaced, so every video contributes
            frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).astype(int)]
        images = load_images(frames, m.input["size"])
        Y = loaded.multi_hot(frames, m.class_ids, ignore_unknown=True)
    except DataError as exc:
        return {"note": f"dataset {root} unreadable ({exc}): mAP change not measured"}
    x = preprocess_batch(images, InputSpec.from_dict(m.input))
    out: dict[str, Any] = {"split": split, "frames": len(frames)}
    for tag, d in (("fp32", fp32_dir), (label, conv_dir)):
        scores = full_path_scores(d, m, x, threads)
        mean, _ = mean_average_precision(Y, scores)
        out[tag] = None if math.isnan(mean) else round(mean, 5)
    out["change"] = None if out["fp32"] is None or out[label] is None else round(out[label] - out["fp32"], 5)
    return out


def full_path_scores(root: Path, m: Manifest, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """Probabilities of the generalist full path (every segment, then tail.onnx) for images ``x``."""
    sessions = [session(root / f, threads) for f in [*m.segments, m.tail]]
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        h = x[i : i + EVAL_BATCH]
        for s in sessions:
            h = s.run(None, {s.get_inputs()[0].name: h})[0]
        out.append(h)
    return np.concatenate(out) if out else np.zeros((0, len(m.classes)), np.float32)
