"""``polymorphd bench``'s tables (table.md) and plots. matplotlib is imported only when plotting.

Plots, each readable without overprinting (no per-point text; a legend per mode, the knobs in report.json):

- ``sweep_map_vs_gflops.png``, ``sweep_map_vs_latency.png``, ``sweep_f1_vs_latency.png``: every point of the
  sweep, one colour per mode; each mode's line is its exit-scale sweep (exits off -> calibrated) at the
  bundle's other knobs, the other points are faint markers, the mode's point at the bundle's knobs is a star,
  and black rings joined by a dashed line mark the Pareto front over all points.
- ``energy.png``: mAP against energy per frame (the title says whether it is metered or estimated).
- ``realsize.png``: real-size median latency per mode and precision (bars), p95 as whiskers.
- ``headline.png``: mAP vs median latency beside the real-size bars: the README's plot.
- ``exit_rates.png``, ``latency_cdf.png``: each mode at the bundle's knobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polymorphd.daemon.tools.sweep import pareto_front
from polymorphd.models.core.errors import MissingExtraError
from polymorphd.models.core.modes import MODES

COLOURS = dict(zip(MODES, ("#444444", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"), strict=True))
MARKERS = dict(zip(MODES, ("s", "^", "o", "D", "v"), strict=True))
CURVES = (
    ("sweep_map_vs_gflops.png", "gflops_per_frame", "map", "GFLOPs per frame", "mAP (%)"),
    ("sweep_map_vs_latency.png", "p50_ms", "map", "median latency per frame (ms)", "mAP (%)"),
    ("sweep_f1_vs_latency.png", "p50_ms", "label_f1", "median latency per frame (ms)", "label F1"),
)


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError(
            "polymorphd bench draws its plots with matplotlib, which is not installed: pip install matplotlib "
            "(table.md and report.json are written before the plots)"
        ) from exc
    return plt


def plot(report: dict[str, Any], latencies: dict[str, np.ndarray], out: Path) -> list[Path]:
    """Every plot of the report into ``out``; MissingExtraError when matplotlib is absent."""
    plt = _plt()
    rows = report["sweep"]
    files = []
    for name, x, y, xl, yl in CURVES:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        curve(ax, rows, x, y, xl, yl)
        ax.set_title(f"{yl.removesuffix(' (%)')} vs {xl.split(' per')[0]}: {report['bundle']}", fontsize=10)
        _legend_right(ax)
        files.append(_save(fig, out / name))

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    source = report["energy"]["source"]
    curve(ax, rows, "energy_mj_per_frame", "map", f"energy per frame (mJ, {_energy_word(source)})", "mAP (%)")
    ax.set_title(f"mAP vs energy per frame ({_energy_word(source)}: {source})", fontsize=10)
    _legend_right(ax)
    files.append(_save(fig, out / "energy.png"))

    if report["realsize"].get("available"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        realsize_bars(ax, report["realsize"])
        files.append(_save(fig, out / "realsize.png"))

    files.append(headline(report, out / "headline.png"))
    files += _mode_plots(report, latencies, out)
    return files


def _energy_word(source: str) -> str:
    return "estimate" if source == "estimate" else f"measured ({source})"


def curve(ax: Any, rows: list[dict[str, Any]], x: str, y: str, xlabel: str, ylabel: str) -> None:
    """One panel: per-mode points and curves, the overall Pareto front marked."""
    scale = 100.0 if y == "map" else 1.0
    xs = np.array([np.nan if r[x] is None else r[x] for r in rows], dtype=float)
    ys = np.array([np.nan if r[y] is None else scale * r[y] for r in rows], dtype=float)
    for m in MODES:
        idx = [i for i, r in enumerate(rows) if r["mode"] == m]
        if not idx:
            continue
        c = COLOURS[m]
        ax.scatter(xs[idx], ys[idx], s=18, color=c, alpha=0.35, marker=MARKERS[m], linewidths=0)
        line = _exit_curve(rows, idx)
        ax.plot(xs[line], ys[line], color=c, marker=MARKERS[m], ms=5, lw=1.6, label=m)
        default = [i for i in idx if rows[i]["point"] == m]
        ax.scatter(
            xs[default], ys[default], s=140, marker="*", color=c, edgecolors="black", linewidths=0.6, zorder=5
        )
    front = np.flatnonzero(pareto_front(xs, ys))
    front = front[np.argsort(xs[front])]
    ax.plot(xs[front], ys[front], ls="--", color="black", lw=0.9, zorder=4, label="Pareto front (all)")
    ax.scatter(xs[front], ys[front], s=70, facecolors="none", edgecolors="black", linewidths=1.0, zorder=6)
    ax.scatter([], [], s=140, marker="*", color="white", edgecolors="black", label="bundle's knobs")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _exit_curve(rows: list[dict[str, Any]], idx: list[int]) -> list[int]:
    """A mode's curve: its exit-scale points at the bundle's other knobs, from exits off to calibrated (the
    max_adapters / recall / continuity points stay markers)."""
    default = next((rows[i] for i in idx if rows[i]["point"] == rows[i]["mode"]), None)
    if default is None:
        return []
    on = [i for i in idx if "no-continuity" not in rows[i]["point"] and rows[i]["exit_scale"] is not None
          and (rows[i]["max_adapters"], rows[i]["recall_threshold"])
          == (default["max_adapters"], default["recall_threshold"])]  # fmt: skip
    return sorted(on, key=lambda i: rows[i]["exit_scale"])


def _legend_right(ax: Any) -> None:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)


def realsize_bars(ax: Any, rs: dict[str, Any]) -> None:
    """Median latency per replayed point (groups) and precision (bars), p95 whiskers."""
    precs = list(rs["precisions"])
    names = list(next(iter(rs["precisions"].values())))
    width = 0.8 / max(1, len(precs))
    for j, p in enumerate(precs):
        rows = rs["precisions"][p]
        med = [rows[n]["p50_ms"] if n in rows else np.nan for n in names]
        p95 = [rows[n]["p95_ms"] if n in rows else np.nan for n in names]
        pos = np.arange(len(names)) + (j - (len(precs) - 1) / 2) * width
        err = np.clip(np.array(p95) - np.array(med), 0, None)
        ax.bar(
            pos,
            med,
            width,
            label=f"{p} ({rs['cpu_support'].get(p, 'native')})" if p != "fp32" else p,
            yerr=[np.zeros(len(names)), err],
            capsize=2,
        )
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([n.replace(" M", "\nM").replace(" s", "\ns") for n in names], fontsize=7)
    g = rs["geometry"]
    ax.set_ylabel("median ms per frame (p95 whisker)")
    ax.set_title(
        f"real size ({g['name']}: {g['img_size']}px, width {g['embed_dim']}, {g['depth']} blocks), "
        f"{rs['threads']} threads, random weights",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def headline(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    has_rs = report["realsize"].get("available")
    fig, axes = plt.subplots(
        1, 2 if has_rs else 1, figsize=(13, 4.8) if has_rs else (7.5, 4.8), squeeze=False
    )
    curve(axes[0][0], report["sweep"], "p50_ms", "map", "median latency per frame (ms)", "mAP (%)")
    axes[0][0].set_title(
        f"{report['bundle']} [{report['split']}]: mAP vs latency across each mode's knobs", fontsize=9
    )
    axes[0][0].legend(fontsize=7, loc="lower right")
    if has_rs:
        realsize_bars(axes[0][1], report["realsize"])
    return _save(fig, path)


def _mode_plots(report: dict[str, Any], latencies: dict[str, np.ndarray], out: Path) -> list[Path]:
    plt = _plt()
    modes = report["modes"]
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(modes)
    keys = list(next(iter(modes.values()))["exit_rate"])
    bottom = np.zeros(len(names))
    for k in keys:
        vals = np.array([modes[m]["exit_rate"][k] for m in names])
        ax.bar(names, vals, bottom=bottom, label="final" if k == "final" else f"exit {k}")
        bottom += vals
    ax.set_ylabel("share of frames")
    ax.set_title("where frames were answered (bundle's knobs)")
    ax.legend()
    files.append(_save(fig, out / "exit_rates.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in names:
        s = np.sort(latencies[m])
        ax.step(s, np.arange(1, len(s) + 1) / len(s), where="post", label=m, color=COLOURS.get(m))
    ax.set_xlabel("latency per frame (ms)")
    ax.set_ylabel("share of frames")
    ax.set_title("latency CDF (bundle's knobs)")
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


# -- table.md ---------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".3f", scale: float = 1.0) -> str:
    return "n/a" if x is None else format(scale * x, fmt)


def markdown(report: dict[str, Any], modes_table: str, footer: str) -> str:
    """table.md: modes, sweep, ablations, real size, energy, targets, then the run's details."""
    word = _energy_word(report["energy"]["source"])
    md = [
        "# polymorphd bench",
        "",
        f"`{report.get('command', '')}`",
        "",
        f"{report.get('host', '')}; load average before/after {report.get('load', {}).get('before')} / "
        f"{report.get('load', {}).get('after')} (a shared machine)",
        "",
        "## Modes at the bundle's knobs",
        "",
        modes_table,
        "",
        f"## Sweep ({len(report['sweep'])} points; P = on the Pareto front of mAP vs GFLOPs / vs latency)",
        "",
        f"| point | mAP | label F1 | GFLOPs | p50 ms | p95 ms | fps | exit rates | adapters/frame "
        f"| energy mJ/frame ({word}) | P |",
        "|" + "---|" * 11,
    ]
    for r in report["sweep"]:
        rates = " ".join(f"{'F' if k == 'final' else k}:{v:.0%}" for k, v in r["exit_rate"].items())
        pf = ("G" if r["pareto_gflops"] else "") + ("L" if r["pareto_latency"] else "")
        md.append(
            f"| {r['point']} | {_f(r['map'], '.2f', 100)} | {_f(r['label_f1'])} | "
            f"{_f(r['gflops_per_frame'], '.4f')} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['fps']:.0f} | "
            f"{rates} | {r['adapters_per_frame']:.2f} | {_f(r['energy_mj_per_frame'], '.2f')} | {pf} |"
        )
    md += ["", "## Ablations", "", *_ablation_lines(report["ablations"]), "", "## Real size", ""]
    md += _realsize_lines(report["realsize"], word)
    md += [
        "",
        "## Energy",
        "",
        f"source: **{word}**; {report['energy'].get('model') or report['energy']['source']}",
        "",
        f"| mode | mAP | energy mJ/frame ({word}) | vs full |",
        "|---|---|---|---|",
    ]
    full_e = report["modes"].get("full", {}).get("energy_mj_per_frame")
    for m, r in report["modes"].items():
        e = r.get("energy_mj_per_frame")
        md.append(
            f"| {m} | {_f(r['map'], '.2f', 100)} | {_f(e, '.2f')} | "
            f"{_f(e / full_e if e is not None and full_e else None, '.2f')}x |"
        )
    md += [
        "",
        "## Targets",
        "",
        *_target_lines(report["targets"]),
        "",
        "```",
        footer,
        "```",
        "",
    ]
    return "\n".join(md)


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _target_lines(t: dict[str, Any]) -> list[str]:
    """Each target met or missed, with the measured ratios (report.json ``targets`` has every number)."""
    out = []
    rs = t.get("realsize_polymorph_vs_full")
    if rs:
        out.append(
            f"- real size, polymorph median <= {rs['target']}x full: {_verdict(rs['met'])}, {rs['ratio']:.2f}x "
            f"(CPU time {_f(rs['cpu_time_ratio'], '.2f')}x)"
        )
    pl = t.get("realsize_full_vs_plain")
    if pl:
        out.append(
            f"- real size, full path within {pl['target']:.0%} of the plain forward: {_verdict(pl['met'])}, "
            f"{pl['full_ms']:.2f} vs {pl['plain_ms']:.2f} ms ({pl['overhead']:+.1%}; CPU time "
            f"{_f(pl['cpu_time_overhead'], '+.1%')})"
        )
    floor = t.get("noise_floor", {})
    for cost, d in t["plots"].items():
        tol = f", within +{d['tol_cost']:.0%} a tie" if d.get("tol_cost") else ""
        noise = (
            f"; identical work spread {floor[cost]:.1%} in this run" if floor.get(cost) is not None else ""
        )
        out.append(f"- {cost}{tol}{noise}:")
        for other in ("switching", "merged"):
            dm = d[f"dominates_{other}"]
            lost = ", ".join(f"{x['point']} {x['cost_ratio']:.3f}x" for x in dm["lost"] if x["cost_ratio"])
            more = f"; polymorph's cost / theirs where not: {lost}" if lost else ""
            out.append(f"  - polymorph dominates {other} ({dm['pairs']} pairs): {_verdict(dm['met'])}{more}")
        ee = d["on_or_above_early_exit"]
        below = ", ".join(
            f"{b['early_exit_point']} ({_f(b['map_gap'], '.2f', 100)} mAP)" for b in ee["below"]
        )
        more = f"; below at {below}" if below else ""
        out.append(f"  - polymorph on or above early-exit: {_verdict(ee['met'])}{more}")
    return out


def _ablation_lines(ab: dict[str, Any]) -> list[str]:
    out = [
        "temporal continuity (" + ab["temporal_continuity"]["source"] + "):",
        "",
        "| exit scale | continuity | mAP | label F1 | adapters/frame | p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in ab["temporal_continuity"]["rows"]:
        for side in ("on", "off"):
            r = row[side]
            if r:
                out.append(
                    f"| {row['exit_scale']:g} | {side} | {_f(r['map'], '.2f', 100)} | {_f(r['label_f1'])} | "
                    f"{r['adapters_per_frame']:.2f} | {r['p50_ms']:.3f} |"
                )
    out += [
        "",
        "max_adapters (" + ab["max_adapters"]["source"] + "):",
        "",
        "| exit scale | max_adapters | mAP | label F1 | adapters/frame | GFLOPs | p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ab["max_adapters"]["rows"]:
        out.append(
            f"| {r['exit_scale']:g} | {r['max_adapters']} | {_f(r['map'], '.2f', 100)} | {_f(r['label_f1'])} | "
            f"{r['adapters_per_frame']:.2f} | {_f(r['gflops_per_frame'], '.4f')} | {r['p50_ms']:.3f} |"
        )
    fr = ab["from_runs"]
    if not fr.get("exit_variants"):
        return [*out, "", f"exit kind, copycat, LoRA rank: {fr.get('why', 'no exit variants in the runs')}"]
    out += [
        "",
        f"exit kind x copycat ({fr['source']}; {len(fr['runs'])} runs, mean ± std):",
        "",
        "| after block | kind | copycat | runs | mAP | label F1 |",
        "|---|---|---|---|---|---|",
    ]
    for e in fr["exit_variants"]:
        out.append(
            f"| {e['after_block']} | {e['kind']} | {'on' if e['copycat'] else 'off (labels)'} | {e['runs']} | "
            f"{_f(e['map_mean'], '.2f', 100)} ± {_f(e['map_std'], '.2f', 100)} | "
            f"{_f(e['label_f1_mean'])} ± {_f(e['label_f1_std'])} |"
        )
    out += [
        "",
        "| LoRA rank | runs | adapters' mAP gain over the generalist (their contexts) |",
        "|---|---|---|",
    ]
    for r in fr["lora_rank"]:
        out.append(
            f"| {r['rank']} | {r['runs']} | {_f(r['adapter_map_gain_mean'], '.2f', 100)} ± "
            f"{_f(r['adapter_map_gain_std'], '.2f', 100)} |"
        )
    if len(fr["lora_rank"]) < 2:
        out.append(
            "",
        )
        out.append(
            "only one LoRA rank among the runs given: other ranks need runs trained with them (--runs)"
        )
    return out


def _realsize_lines(rs: dict[str, Any], word: str) -> list[str]:
    if not rs.get("available"):
        return [f"not measured: {rs.get('why')}"]
    g = rs["geometry"]
    out = [
        f"{g['name']} geometry ({g['img_size']}x{g['img_size']}, patch {g['patch_size']}, width {g['embed_dim']}, "
        f"{g['depth']} blocks), {rs['weights']}, {rs['threads']} threads, {rs['frames_per_point']} frames per point, "
        "the recorded per-frame decisions replayed; p50/p95 = preprocess + inference, `infer p50` = inference "
        "only (what the plain forward compares with).",
        "",
        f"| precision (CPU) | point | p50 ms | p95 ms | infer p50 ms | CPU p50 ms | vs full | energy mJ/frame ({word}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, rows in rs["precisions"].items():
        label = p if p == "fp32" else f"{p} ({rs['cpu_support'].get(p, '')})"
        for n, r in rows.items():
            out.append(
                f"| {label} | {n} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['inference_p50_ms']:.2f} | "
                f"{_f(r.get('cpu_p50_ms'), '.2f')} | "
                f"{_f(r['vs_full'], '.2f')}x | {_f(r['energy_mj_per_frame'], '.1f')} |"
            )
    for p, why in rs.get("not_run", {}).items():
        out.append(f"\n{p}: not run: {why}")
    return out
