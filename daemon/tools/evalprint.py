"""What ``polymorphd eval`` prints: the per-mode table, label quality by answering exit, the video-bootstrap
intervals and the footer, all from the JSON-ready report ``evaluate.evaluate`` returns. Torch-free."""

from __future__ import annotations

import json
from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """One Markdown table: mode | mAP | label F1 | exact match | exit rates | adapters/frame | GFLOPs | p50 |
    p95 | fps | speedup."""
    head = (
        "| mode | mAP | label F1 | exact match | exit rates | adapters/frame | GFLOPs/frame "
        "| p50 ms | p95 ms | fps | speedup vs full |"
    )
    lines = [head, "|" + "---|" * 11]
    for m, row in report["modes"].items():
        rates = " ".join(f"{'F' if k == 'final' else k}:{v:.0%}" for k, v in row["exit_rate"].items())
        mean_ap = "n/a" if row["map"] is None else f"{100 * row['map']:.2f}"
        gf = "n/a" if row["gflops_per_frame"] is None else f"{row['gflops_per_frame']:.4f}"
        sp = "n/a" if row["speedup_vs_full"] is None else f"{row['speedup_vs_full']:.2f}x"
        lines.append(
            f"| {m} | {mean_ap} | {_f1(row['label_f1'])} | {_pct(row['exact_match'])} | {rates} | "
            f"{row['adapters_per_frame']:.2f} | {gf} | {row['latency_ms']['p50']:.3f} | "
            f"{row['latency_ms']['p95']:.3f} | {row['fps']:.0f} | {sp} |"
        )
    return "\n".join(lines)


def _f1(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def format_by_exit(report: dict[str, Any]) -> str:
    """Label F1 / exact match per answering exit, one line per mode; exits that answered no annotated
    frame are left out."""
    width = max(len(m) for m in report["modes"])
    lines = ["label F1 / exact match by answering exit (annotated frames):"]
    for m, row in report["modes"].items():
        parts = [
            f"{'F' if k == 'final' else k}: {_f1(q['label_f1'])} / {_pct(q['exact_match'])} "
            f"({q['annotated_frames']})"
            for k, q in row["label_quality_by_exit"].items()
            if q["annotated_frames"]
        ]
        lines.append(f"  {m:<{width}}  {', '.join(parts) or 'no annotated frames'}")
    return "\n".join(lines)


def format_intervals(report: dict[str, Any]) -> str:
    """One line per mode: the 95 % video-bootstrap intervals of mAP and label F1, and of the difference from
    full; empty when the report has none."""
    if not report.get("resamples"):
        return ""

    def span(ci: list[float] | tuple[float, float] | None, scale: float, fmt: str) -> str:
        return "n/a" if ci is None else f"[{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]"

    width = max(len(m) for m in report["modes"])
    lines = [
        f"95 % interval over {report['resamples']} draws of the {report['videos']} videos "
        "(mAP x100 / label F1; 'vs full': paired difference):"
    ]
    for m, row in report["modes"].items():
        line = f"  {m:<{width}}  mAP {span(row.get('map_ci95'), 100, '.2f')}  F1 {span(row.get('label_f1_ci95'), 1, '.3f')}"
        if row.get("map_vs_full_ci95") is not None:
            d_map, d_f1 = row["map_vs_full"], row["label_f1_vs_full"]
            line += (
                f"  vs full: mAP {'n/a' if d_map is None else f'{100 * d_map:+.2f}'} "
                f"{span(row['map_vs_full_ci95'], 100, '+.2f')}, F1 {'n/a' if d_f1 is None else f'{d_f1:+.3f}'} "
                f"{span(row['label_f1_vs_full_ci95'], 1, '+.3f')}"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def format_footer(report: dict[str, Any]) -> str:
    over = ", ".join(f"{m} {r['overhead_ms_median']:.3f}" for m, r in report["modes"].items())
    counts = ", ".join(
        f"{m} {r['count_mae']:.3f}" for m, r in report["modes"].items() if r.get("count_mae") is not None
    )
    return (
        f"{report['bundle']} on {report['data']} [{report['split']}]: {report['frames']} frames per mode "
        f"({report['annotated_frames']} annotated, {report['videos']} videos), {report['threads']} threads, "
        f"{', '.join(report['providers'])}\n"
        f"{format_by_exit(report)}\n"
        f"{format_intervals(report)}"
        f"engine overhead outside ORT, median ms: {over}\n"
        + (f"count MAE (objects per annotated frame): {counts}\n" if counts else "")
        + f"peak RSS {report['peak_rss_mb']:.0f} MB; mAP: {report['map_definition']}\n"
        f"label F1: {report['label_definition']}"
        + (f"\nknobs set: {json.dumps(report['knobs'])}" if report.get("knobs") else "")
    )
