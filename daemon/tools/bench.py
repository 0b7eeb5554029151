"""``polymorphd bench``: every mode side by side (``eval --mode all``), written as a report directory.

OUT/table.md (the table plus run details: mAP, label F1 and exact match per mode, and per answering exit
in the footer), OUT/report.json (eval's full report), and three plots: latency_vs_map.png (latency against
mAP and against label F1), exit_rates.png, latency_cdf.png. matplotlib is imported only here, and only
when plotting.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from polymorphd.daemon.tools.evaluate import EvalResult, format_footer, format_table, run_eval, write_json
from polymorphd.models.core.errors import MissingExtraError
from polymorphd.models.core.modes import MODES

log = logging.getLogger(__name__)


def write_report(result: EvalResult, out: str | Path, *, command: str = "") -> list[Path]:
    """Write table.md, report.json and the plots into ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(result.report)
    if command:
        report["command"] = command
    table = format_table(report)
    md = ["# polymorphd bench", "", table, "", "```", format_footer(report), "```", ""]
    if command:
        md[1:1] = ["", f"`{command}`"]
    files = [out / "table.md", out / "report.json"]
    files[0].write_text("\n".join(md))
    write_json(files[1], report)
    files += plot(result, out)
    return files


def plot(result: EvalResult, out: Path) -> list[Path]:
    """Latency vs mAP and vs label F1 per mode, exit-rate bars, latency CDF; MissingExtraError when
    matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError(
            "polymorphd bench draws its plots with matplotlib, which is not installed: pip install matplotlib "
            f"(table.md and report.json were written to {out})"
        ) from exc
    modes: dict[str, Any] = result.report["modes"]
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("map", 100, "mAP (%)"), ("label_f1", 1, "label F1"))  # scales as in the table
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for m, row in modes.items():
            y = scale * row[key] if row[key] is not None else np.nan
            ax.scatter(row["latency_ms"]["p50"], y, s=60)
            ax.annotate(m, (row["latency_ms"]["p50"], y), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("median latency per frame (ms)")
        ax.set_ylabel(label)
        ax.set_title(f"latency vs {label.removesuffix(' (%)')} per mode")
        ax.grid(alpha=0.3)
    files.append(_save(fig, out / "latency_vs_map.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(modes)
    keys = list(next(iter(modes.values()))["exit_rate"])
    bottom = np.zeros(len(names))
    for k in keys:
        vals = np.array([modes[m]["exit_rate"][k] for m in names])
        ax.bar(names, vals, bottom=bottom, label="final" if k == "final" else f"exit {k}")
        bottom += vals
    ax.set_ylabel("share of frames")
    ax.set_title("where frames were answered")
    ax.legend()
    files.append(_save(fig, out / "exit_rates.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, lat in result.latencies.items():
        s = np.sort(lat)
        ax.step(s, np.arange(1, len(s) + 1) / len(s), where="post", label=m)
    ax.set_xlabel("latency per frame (ms)")
    ax.set_ylabel("share of frames")
    ax.set_title("latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    files.append(_save(fig, out / "latency_cdf.png"))
    return files


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cli_bench(args: argparse.Namespace) -> int:
    result = run_eval(args, list(MODES))
    command = (
        f"polymorphd bench --bundle {args.bundle} --data {args.data} --out {args.out} --split {result.report['split']} "
        f"--threads {args.threads}" + (f" --max-frames {args.max_frames}" if args.max_frames else "")
    )
    files = write_report(result, args.out, command=command)
    print(format_table(result.report))
    print(format_footer(result.report))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0
