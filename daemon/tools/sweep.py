"""``polymorphd bench``'s operating points, Pareto fronts, energy model, ablations and target checks. Torch-free.

The sweep moves the knobs that trade accuracy for cost (``models/core/knobs.py``):

- **exit scale** ``s``: the exits' thresholds pulled from "never decide" (s = 0: lo = 0, hi = 1) to the
  bundle's calibrated ones (s = 1): lo = s * lo_cal, hi = 1 - s * (1 - hi_cal). One number per point, so
  every mode's curve is drawn along it. (Recalibrating at other tolerances needs the exits' validation scores,
  which the bundle does not keep; the scale moves the same thresholds the daemon's ``set`` moves.)
- **max_adapters** and **recall_threshold** (context modes only), at the first and last exit scale.

A point is named ``<mode> s<scale> M<max_adapters> r<recall>`` (``point_name``); each mode's point at the bundle's own knobs is
named by the mode alone (the ``modes`` table). Energy comes from the daemon's meter where there is one, else
from ``ENERGY_MODEL``, and says which.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polymorphd.daemon.modes import CONTEXT_MODES
from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.modes import MODES

EXIT_SCALES = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)
MAX_ADAPTERS = (1, 2, 3)
RECALLS = (0.1, 0.2, 0.4)
NO_CONTINUITY = {"keep_frames": 0, "surprise_jaccard": 0.0}  # contexts from the current frame's exit only

# Energy estimate where no meter exists: busy-core time x package power per busy core. AMD EPYC (Zen 4,
# this machine's flags) packages run at about 360 W for 96 cores; 3.75 W per busy core is that average,
# uncore included. Process CPU time counts every ORT thread. A stated model, not a measurement.
WATTS_PER_BUSY_CORE = 3.75
ENERGY_MODEL = (
    f"estimate: process CPU time per frame x {WATTS_PER_BUSY_CORE} W per busy core "
    "(AMD EPYC Zen 4 package power / cores, uncore included); no power meter on this machine"
)


def scaled_thresholds(calibrated: Sequence[Sequence[float]], scale: float) -> list[list[float]]:
    """The exits' [lo, hi] pairs at exit scale ``scale`` in [0, 1] (0: exits never decide, 1: calibrated)."""
    if not 0.0 <= scale <= 1.0:
        raise ConfigError(f"exit scale {scale:g} invalid: need 0 <= scale <= 1 (0: exits off, 1: calibrated)")
    return [[scale * lo, 1.0 - scale * (1.0 - hi)] for lo, hi in calibrated]


def sweep_points(
    knobs: dict[str, Any],
    *,
    modes: Sequence[str] = MODES,
    exit_scales: Sequence[float] = EXIT_SCALES,
    max_adapters: Sequence[int] = MAX_ADAPTERS,
    recalls: Sequence[float] = RECALLS,
) -> dict[str, dict[str, Any]]:
    """{point name: knobs} for every mode (``knobs``: the engine's at the start, ``Engine.knobs()``).

    Each mode's point at the bundle's own knobs comes first, named by the mode; ``full`` has no other."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"modes {list(modes)} invalid: choose among {', '.join(MODES)}")
    cal = knobs["exit_thresholds"]
    m0, r0 = knobs["max_adapters"], knobs["recall_threshold"]
    points: dict[str, dict[str, Any]] = {m: {"mode": m} for m in modes}
    seen = {_key(m, 1.0, m0, r0) for m in modes}
    scales = sorted({float(s) for s in exit_scales}, reverse=True)
    for m in modes:
        if m == "full":
            continue
        grid = [(s, m0, r0) for s in scales]
        if m in CONTEXT_MODES:
            ends = sorted({scales[0], scales[-1]}) if scales else []
            grid += [(s, a, r0) for s in ends for a in max_adapters]
            grid += [(s, m0, r) for s in ends for r in recalls]
        for s, a, r in grid:
            key = _key(m, s, a, r)
            if key in seen:
                continue
            seen.add(key)
            points[point_name(m, s, a, r)] = {
                "mode": m,
                "exit_thresholds": scaled_thresholds(cal, s),
                "max_adapters": a,
                "recall_threshold": r,
            }
    return points


def point_name(mode: str, scale: float, max_adapters: int, recall: float) -> str:
    """``<mode> s<scale>``, plus ``M<max_adapters> r<recall>`` for the context modes (the others ignore them)."""
    tail = f" M{max_adapters} r{recall:g}" if mode in CONTEXT_MODES else ""
    return f"{mode} s{scale:g}{tail}"


def _key(mode: str, scale: float, m: int, r: float) -> tuple:
    return (mode, round(scale, 6), m, round(r, 6)) if mode in CONTEXT_MODES else (mode, round(scale, 6))


def continuity_points(knobs: dict[str, Any], scales: Sequence[float]) -> dict[str, dict[str, Any]]:
    """The temporal-continuity ablation: polymorph with contexts from the current frame only, per scale."""
    cal = knobs["exit_thresholds"]
    return {
        f"polymorph s{s:g} no-continuity": {
            "mode": "polymorph",
            "exit_thresholds": scaled_thresholds(cal, s),
            **NO_CONTINUITY,
        }
        for s in scales
    }


def exit_scale_of(knobs: dict[str, Any], calibrated: Sequence[Sequence[float]]) -> float | None:
    """The scale a point's thresholds sit at (1.0 when it uses the bundle's), None when none fits."""
    thr = knobs.get("exit_thresholds")
    if thr is None:
        return 1.0
    for lo_hi, cal in zip(thr, calibrated, strict=True):
        span = 1.0 - cal[1] + cal[0]
        if span > 0:
            return round((lo_hi[0] + 1.0 - lo_hi[1]) / span, 6)
    return None


def pareto_front(cost: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point beats: none has cost <= and quality >= with one of them strict.
    Points with a missing (nan/None) value are never on the front."""
    c = np.array([np.nan if v is None else v for v in cost], dtype=np.float64)
    q = np.array([np.nan if v is None else v for v in quality], dtype=np.float64)
    if c.shape != q.shape:
        raise ValueError(f"cost has {c.size} values, quality {q.size}")
    ok = np.isfinite(c) & np.isfinite(q)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        better = ok & (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))
        front[i] = not better.any()
    return front


def energy_mj(row: dict[str, Any]) -> float | None:
    """A row's energy per frame: the meter's mean where measured, else the estimate (``ENERGY_MODEL``)."""
    if row.get("energy_mj_per_frame") is not None:
        return float(row["energy_mj_per_frame"])
    cpu = row.get("cpu_ms_per_frame")
    return None if cpu is None else cpu * WATTS_PER_BUSY_CORE  # ms x W = mJ


def sweep_rows(
    modes: dict[str, dict[str, Any]],
    points: dict[str, dict[str, Any]],
    calibrated: Sequence[Sequence[float]],
    defaults: dict[str, Any],
) -> list[dict[str, Any]]:
    """report.json's ``sweep``: one flat row per point (knobs, quality, cost, exits, adapters, energy)."""
    rows = []
    for name, knobs in points.items():
        r = modes[name]
        rows.append(
            {
                "point": name,
                "mode": r["mode"],
                "exit_scale": exit_scale_of(knobs, calibrated),
                "max_adapters": knobs.get("max_adapters", defaults["max_adapters"]),
                "recall_threshold": knobs.get("recall_threshold", defaults["recall_threshold"]),
                "knobs": {k: v for k, v in knobs.items() if k != "mode"},
                "map": r["map"],
                "label_f1": r["label_f1"],
                "exact_match": r["exact_match"],
                "gflops_per_frame": r["gflops_per_frame"],
                "p50_ms": r["latency_ms"]["p50"],
                "p95_ms": r["latency_ms"]["p95"],
                "mean_ms": r["latency_ms"]["mean"],
                "fps": r["fps"],
                "exit_rate": r["exit_rate"],
                "adapters_per_frame": r["adapters_per_frame"],
                "cpu_ms_per_frame": r.get("cpu_ms_per_frame"),
                "energy_mj_per_frame": energy_mj(r),
            }
        )
    for cost in ("gflops_per_frame", "p50_ms"):
        front = pareto_front([r[cost] for r in rows], [r["map"] for r in rows])
        for r, f in zip(rows, front, strict=True):
            r[f"pareto_{'gflops' if cost.startswith('g') else 'latency'}"] = bool(f)
    return rows


def dominance(
    rows: list[dict[str, Any]], cost: str, *, tol: float = 1e-3, cost_tol: float = 0.0
) -> dict[str, Any]:
    """The plot target on one cost axis: does polymorph dominate switching and merged (same knobs: mAP >=
    theirs - tol at <= their cost x (1 + cost_tol)), and is its curve on or above early-exit's (for every
    early-exit point, a polymorph point at <= its cost x (1 + cost_tol) with mAP >= its mAP - tol)? Gaps are
    measured, in mAP and cost ratios. ``cost_tol`` is the timing noise allowed (latency; 0 for GFLOPs)."""
    by = {(r["mode"], _suffix(r)): r for r in rows}
    out: dict[str, Any] = {"cost": cost, "tol_map": tol, "tol_cost": cost_tol}
    slack = 1.0 + cost_tol
    for other in ("switching", "merged"):
        pairs = [(p, by[(other, s)]) for (m, s), p in by.items() if m == "polymorph" and (other, s) in by]
        lost = [
            {"point": o["point"], "map_gap": _gap(o["map"], p["map"]), "cost_ratio": _ratio(p[cost], o[cost])}
            for p, o in pairs
            if _gap(o["map"], p["map"]) > tol or p[cost] > o[cost] * slack
        ]
        out[f"dominates_{other}"] = {"met": bool(pairs) and not lost, "pairs": len(pairs), "lost": lost}
    poly = [r for r in rows if r["mode"] == "polymorph" and r["map"] is not None]
    below = []
    for e in (r for r in rows if r["mode"] == "early-exit" and r["map"] is not None):
        cheaper = [p["map"] for p in poly if p[cost] <= e[cost] * slack]
        gap = e["map"] - max(cheaper) if cheaper else math.inf
        if gap > tol:
            best = min(poly, key=lambda p: abs(p[cost] - e[cost]), default=None)
            below.append(
                {
                    "early_exit_point": e["point"],
                    "map_gap": None if math.isinf(gap) else gap,
                    "nearest_polymorph": best and best["point"],
                    "cost_ratio": best and _ratio(best[cost], e[cost]),
                }
            )
    out["on_or_above_early_exit"] = {"met": bool(poly) and not below, "below": below}
    return out


def noise_floor(rows: list[dict[str, Any]], cost: str) -> float | None:
    """Relative spread (max / min - 1) of ``cost`` among the modes' points at the bundle's knobs that did the
    same work (same exit rates, no adapters): what the machine's noise alone moves a median in this run."""
    same = [
        r for r in rows if r["point"] == r["mode"] and r["mode"] != "full" and not r["adapters_per_frame"]
    ]
    if len(same) < 2 or len({json.dumps(r["exit_rate"], sort_keys=True) for r in same}) != 1:
        return None
    vals = [r[cost] for r in same]
    return max(vals) / min(vals) - 1.0 if min(vals) > 0 else None


def _suffix(row: dict[str, Any]) -> str:
    name = row["point"]
    return "" if name == row["mode"] else name[len(row["mode"]) :]


def _gap(a: float | None, b: float | None) -> float:
    return math.nan if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ablations_from_runs(runs: Sequence[str | Path]) -> dict[str, Any]:
    """SL-ViT vs MLP exits, copycat on/off and LoRA rank from training runs' report.json (``--runs``): mean
    ± std over the runs (seeds) of each exit variant's test mAP / label F1, per exit position; adapters' mAP
    gain over the generalist per LoRA rank. bench trains nothing: these are the runs' own numbers. Runs that
    share their trained exits (``bench/lora_rank.py`` copies them) count once in the exit variants."""
    variants: dict[tuple[int, str, bool], list[dict[str, float]]] = {}
    ranks: dict[int, list[float]] = {}
    used = []
    exits_seen: dict[str, str] = {}
    for run in runs:
        path = Path(run)
        try:
            report = json.loads((path / "report.json").read_text())
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--runs {path}: not a finished training run ({exc})") from exc
        exits_id = _exits_id(path)
        shared = exits_seen.setdefault(exits_id, str(path))  # the run whose trained exits these are
        used.append({"run": str(path), "preset": report.get("preset"), "split": _report_split(report),
                     "lora_rank": int(config["lora"]["rank"]), "exits_of": shared})  # fmt: skip
        if shared == str(path):  # the same exits (bench/lora_rank.py copies them) count once
            for e in report.get("exits", []):
                key = (int(e["after_block"]), str(e["kind"]), bool(e["copycat"]))
                variants.setdefault(key, []).append({k: e.get(k) for k in ("map", "label_f1", "exact_match")})
        gains = [
            a["map_adapter"] - a["map_generalist"]
            for a in report.get("adapters", [])
            if a.get("map_adapter") is not None and a.get("map_generalist") is not None
        ]
        if gains:
            ranks.setdefault(int(config["lora"]["rank"]), []).append(float(np.mean(gains)))
    exits = [
        {
            "after_block": b,
            "kind": k,
            "copycat": c,
            "runs": len(v),
            **{f"{m}_{s}": _agg([x[m] for x in v], s) for m in ("map", "label_f1") for s in ("mean", "std")},
        }
        for (b, k, c), v in sorted(variants.items())
    ]
    return {
        "source": "training reports (test split) of the runs passed with --runs; bench does not train",
        "runs": used,
        "exit_variants": exits,
        "lora_rank": [
            {
                "rank": r,
                "runs": len(g),
                "adapter_map_gain_mean": float(np.mean(g)),
                "adapter_map_gain_std": float(np.std(g)),
            }
            for r, g in sorted(ranks.items())
        ],
    }


def _exits_id(run: Path) -> str:
    """What identifies a run's trained exits: its exits stage record (a copied run shares it), else the path."""
    try:
        record = json.loads((run / "stages.json").read_text())["stages"]["exits"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(run.resolve())
    return json.dumps(record, sort_keys=True)


def _report_split(report: dict[str, Any]) -> str | None:
    return (report.get("splits", {}).get("report") or {}).get("name")


def _agg(values: list[float | None], stat: str) -> float | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return float(np.mean(v) if stat == "mean" else np.std(v))
