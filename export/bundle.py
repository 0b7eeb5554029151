"""``polymorphd export``: a training run -> a verified, optionally signed bundle directory (docs/bundle.md).

Atomic: everything is written to a temporary sibling directory, checked with ``verify_bundle``, fsynced and
renamed into place, so a failed export leaves nothing behind and an existing bundle is never touched.
An adapter bundle (``adapters_only``) holds contexts and adapters only; its base_sha256 comes from exporting
the base graphs to a scratch directory with the same options (export is deterministic), so it equals the
base_sha256 of a full bundle exported from the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from polymorphd.export.core.manifest import (
    AUDIO_SCHEMA_VERSION,
    MANIFEST,
    REPORT,
    SIGNATURE,
    AdapterEntry,
    AudioBlock,
    AudioExitEntry,
    ContextEntry,
    ExitEntry,
    Manifest,
    base_files,
    base_hash,
    sha256_file,
)
from polymorphd.export.core.signing import load_private_key, sign
from polymorphd.export.core.timing import latency_ms, random_feeds, session
from polymorphd.export.core.verify import expected_graphs, verify_bundle
from polymorphd.export.onnx import DEFAULT_EXPORTER, OPSET, Exporter, export_graph, write_tensor_file
from polymorphd.export.plan import adapter_tensors, lora_names, plan_graphs, segment_bounds, tail_base_tensors
from polymorphd.export.quantize import Quantize, compare, convert_graph
from polymorphd.models.core.cost import bundle_gflops
from polymorphd.models.core.errors import BundleError, CheckpointError, ConfigError
from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn.lora import tail_start
from polymorphd.models.train.run import Run, load_run

log = logging.getLogger(__name__)

TAIL_BASE = "tail_base.onnx_adapter"
BENCH_RUNS = 50
THREADS = 2  # the board's intra-op setting; latencies in the report use it


def export_bundle(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quantize: Quantize | None = None,
    fp16: bool = False,
    sign_key: str | os.PathLike | None = None,
    adapters_only: bool = False,
    version: int | None = None,
    bundle_id: str | None = None,
    exporter: Exporter = DEFAULT_EXPORTER,
    bench_runs: int = BENCH_RUNS,
    progress: bool = True,
) -> Path:
    """Export ``run_dir`` to a new bundle directory ``out_dir``; returns its path."""
    out = Path(out_dir)
    if out.exists():
        raise BundleError(
            f"bundle directory {out} already exists: bundles are immutable; choose a new --out "
            "(for instance with the next --version) or remove the old one first"
        )
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize {quantize!r} invalid: choose 'int8' or none")
    if quantize and fp16:
        raise ConfigError("choose either --quantize int8 (CPU boards) or --fp16 (GPU boards), not both")
    if version is not None and version < 1:
        raise ConfigError(f"bundle version must be >= 1, got {version}")
    if sign_key is not None:
        load_private_key(sign_key)  # fail before minutes of export, not after
    run = load_run(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="polymorphd-export-") as scratch:
            opts = {"exporter": exporter, "quantize": quantize, "fp16": fp16, "progress": progress}
            if adapters_only:
                base_dir = Path(scratch) / "base"
                base_dir.mkdir()
                _write_graphs(run, base_dir, Path(scratch), **opts)
                manifest = _manifest(run, base_dir, "adapters", exporter, quantize, fp16, version, bundle_id)
                _write_adapters(run, tmp, manifest)
                report = _size_report(tmp, manifest)
            else:
                _write_graphs(run, tmp, Path(scratch), **opts)
                manifest = _manifest(run, tmp, "full", exporter, quantize, fp16, version, bundle_id)
                _write_adapters(run, tmp, manifest)
                write_tensor_file(tmp / TAIL_BASE, tail_base_tensors(run))
                report = _size_report(tmp, manifest)
                report["latency_ms"] = _latencies(tmp, manifest, bench_runs)
                if quantize or fp16:
                    report["quantization"] = compare(
                        manifest,
                        Path(scratch) / "fp32",
                        tmp,
                        label=quantize or "fp16",
                        data=_dataset(run),
                        runs=bench_runs,
                        threads=THREADS,
                    )
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        manifest.files = {
            p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        raw = manifest.to_json()
        (tmp / MANIFEST).write_bytes(raw)
        if sign_key is not None:
            (tmp / SIGNATURE).write_bytes(sign(raw, sign_key))
        verify_bundle(tmp)  # the contract the engine relies on, checked before anything is published
        _fsync_tree(tmp)
        if out.exists():
            raise BundleError(f"bundle directory {out} appeared during the export; not overwriting it")
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s (%s) to %s", manifest.ident, manifest.kind, out)
    return out


def _write_graphs(
    run: Run,
    dest: Path,
    scratch: Path,
    *,
    exporter: Exporter,
    quantize: Quantize | None,
    fp16: bool,
    progress: bool,
) -> None:
    """Export, check against torch, and (when asked) convert every graph; fp32 originals stay in scratch."""
    convert = bool(quantize or fp16)
    fp32_dir = scratch / "fp32" if convert else dest
    fp32_dir.mkdir(parents=True, exist_ok=True)
    specs = plan_graphs(run)
    bar = None if progress else True  # None: tqdm shows no bar when stderr is not a terminal
    for spec in tqdm(specs, desc="exporting graphs", unit="graph", disable=bar):
        diff = export_graph(spec, fp32_dir / spec.file, exporter=exporter)
        log.info("exported %s (ORT vs torch max abs diff %.2e)", spec.file, diff)
        if convert:
            convert_graph(fp32_dir / spec.file, dest / spec.file, quantize=quantize, fp16=fp16)


def _write_adapters(run: Run, dest: Path, manifest: Manifest) -> None:
    (dest / "adapters").mkdir(exist_ok=True)
    for entry, adapter in zip(manifest.adapters, run.adapters, strict=True):
        write_tensor_file(dest / entry.file, adapter_tensors(adapter))


def _manifest(
    run: Run,
    graph_dir: Path,
    kind: str,
    exporter: Exporter,
    quantize: Quantize | None,
    fp16: bool,
    version: int | None,
    bundle_id: str | None,
) -> Manifest:
    """Manifest of a bundle whose graphs are in ``graph_dir`` (files filled in later)."""
    cfg, cal = run.vit_config, run.calibration
    bounds = segment_bounds(run)
    t = tail_start(cfg, run.lora)
    k = cfg.num_classes
    classes, class_ids = list(run.config.get("classes", [])), list(run.config.get("class_ids", []))
    if len(classes) != k or len(class_ids) != k:
        raise CheckpointError(
            f"{run.path / 'config.json'}: {len(classes)} class names and {len(class_ids)} class ids for a "
            f"{k}-class model; the run is inconsistent: re-run polymorphd train"
        )
    cal_exits = cal.get("exits", [])
    if len(cal_exits) != len(run.exits):
        raise CheckpointError(
            f"{run.path / 'calibration.json'}: {len(cal_exits)} exit thresholds for {len(run.exits)} exits; "
            "re-run the calibration stage of polymorphd train"
        )
    thresholds = [float(x) for x in cal.get("class_thresholds", [])]
    if len(thresholds) != k:
        raise CheckpointError(
            f"{run.path / 'calibration.json'}: {len(thresholds)} class_thresholds for {k} classes"
        )
    segments = [f"segment_{i}.onnx" for i in range(len(bounds))]
    tails = {"tail": "tail.onnx", "tail_lora": "tail_lora.onnx", "tail_weights": "tail_weights.onnx"}
    hashes = [sha256_file(graph_dir / f) for f in [*segments, *tails.values()]]
    base = base_hash(hashes)
    full = kind == "full"
    lora = {
        "rank": run.lora.rank,
        "alpha": run.lora.alpha,
        "targets": list(run.lora.targets),
        "names": [n.onnx for n in lora_names(run)],
    }
    model = {
        "embed_dim": cfg.embed_dim,
        "num_tokens": cfg.num_tokens,
        "mlp_hidden": int(cfg.embed_dim * cfg.mlp_ratio),
        "depth": cfg.depth,
        "num_classes": k,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
    }
    export = {
        "exporter": exporter,
        "opset": OPSET,
        "quantize": quantize,
        "fp16": fp16,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    m = Manifest(
        kind=kind,  # type: ignore[arg-type]
        bundle_id=bundle_id or f"{run.path.name}-{base[:4]}",
        version=version or (1 if full else 2),  # an adapter bundle is by default the base (1) + 1
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        base_sha256=base,
        input=InputSpec.from_dict(run.config["input"]).to_dict(),
        classes=classes,
        class_ids=class_ids,
        contexts=[
            ContextEntry(j, f"ctx{j}", sorted(int(c) for c in ctx)) for j, ctx in enumerate(run.contexts)
        ],
        exits=[
            ExitEntry(
                ec.after_block,
                f"exit_{i}.onnx",
                {"lo": float(th["lo"]), "hi": float(th["hi"])},
                ec.kind,
                centred="logit_offsets" in th,
            )
            for i, (ec, th) in enumerate(zip(run.exit_configs, cal_exits, strict=True))
        ]
        if full
        else [],
        segments=segments if full else [],
        segment_blocks=[list(b) for b in bounds] if full else [],
        tail=tails["tail"] if full else None,
        tail_lora=tails["tail_lora"] if full else None,
        tail_weights=tails["tail_weights"] if full else None,
        tail_base=TAIL_BASE if full else None,
        tail_start=t,
        lora=lora,
        adapters=[
            AdapterEntry(j, f"adapters/ctx{j}.onnx_adapter", run.lora.rank) for j in range(len(run.contexts))
        ],
        class_thresholds=thresholds,
        policy=dict(cal.get("policy", {})),
        model=model,
        gflops=bundle_gflops(cfg, bounds, run.exit_configs, run.lora) if full else None,
        export=export,
        files={},
    )
    if full and run.avexits is not None:  # schema_version 2: docs/bundle.md "Audio"
        m.schema_version = AUDIO_SCHEMA_VERSION
        m.audio = AudioBlock(
            mel=asdict(run.avexits.mel),
            exits=[
                AudioExitEntry(
                    ex.cfg.after_block, f"av_exit_{i}.onnx", {"lo": float(c["lo"]), "hi": float(c["hi"])},
                    float(c["count_margin"]),
                )
                for i, (ex, c) in enumerate(zip(run.avexits.exits, run.avexits.calibration, strict=True))
            ],
        )  # fmt: skip
    if len(run.adapters) != len(run.contexts):
        raise CheckpointError(f"{run.path}: {len(run.adapters)} adapters for {len(run.contexts)} contexts")
    assert base_files(m) == ([*segments, *tails.values()] if full else [])
    return m


def _size_report(root: Path, m: Manifest) -> dict[str, Any]:
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    return {
        "bundle": m.ident,
        "kind": m.kind,
        "base_sha256": m.base_sha256,
        "export": m.export,
        "bytes": sizes,
        "total_bytes": sum(sizes.values()),
    }


def _latencies(root: Path, m: Manifest, runs: int) -> dict[str, Any]:
    """Median ORT latency per graph at the board's thread count: B = 1 frame, M = 2 adapters."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"threads": THREADS, "runs": runs, "batch": {"B": 1, "M": 2}}
    for file, (ins, _) in expected_graphs(m).items():
        out[file] = round(latency_ms(session(root / file, THREADS), random_feeds(ins, rng), runs), 4)
    return out


def _dataset(run: Run) -> str | None:
    data = run.config.get("data") or run.config.get("dataset")
    if not data:
        return None
    p = Path(data)
    return str(p if p.is_absolute() or p.exists() else run.path / p)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def format_report(report: dict[str, Any]) -> str:
    """The export report as a short text table for the terminal."""
    lines = [f"bundle {report['bundle']} ({report['kind']}), {report['total_bytes'] / 1e6:.2f} MB"]
    lat = report.get("latency_ms", {})
    q = report.get("quantization")
    for f, n in report["bytes"].items():
        extra = f"  {lat[f]:8.3f} ms" if f in lat else ""
        if q and f in q["graphs"]:  # the interleaved pair, so the two numbers compare
            g = q["graphs"][f]
            extra = f"  {g[q['mode'] + '_ms']:8.3f} ms (fp32 {g['fp32_ms']:.3f} ms, x{g['speedup']:.2f})"
        lines.append(f"  {f:32s} {n / 1e3:10.1f} kB{extra}")
    if lat:
        lines.append(f"  latency: median of {lat['runs']} runs, {lat['threads']} threads, B=1, M=2")
    if q:
        fp = q["full_path_ms"]
        lines.append(
            f"  full path {fp['fp32']:.3f} ms fp32 -> {fp[q['mode']]:.3f} ms {q['mode']} (x{fp['speedup']:.2f})"
        )
        mp = q["map"]
        if "note" in mp:
            lines.append(f"  mAP: {mp['note']}")
        else:
            lines.append(
                f"  mAP ({mp['split']}, {mp['frames']} frames): fp32 {mp['fp32']} -> {q['mode']} {mp[q['mode']]} "
                f"(change {mp['change']})"
            )
    return "\n".join(lines)


def cli_export(args: argparse.Namespace) -> int:
    out = export_bundle(
        args.run,
        args.out,
        quantize=args.quantize,
        fp16=args.fp16,
        sign_key=args.sign_key,
        adapters_only=args.adapters_only,
        version=args.version,
    )
    report = json.loads((out / REPORT).read_text())
    print(format_report(report))
    print(f"wrote {out}")
    return 0
