"""A training run's report: what it achieved, in numbers (``build_report``) and tables (``render_markdown``).

Built only from the stage records plus the configs, so a resumed run reports the
same numbers as an uninterrupted one; ``run.save_report`` writes both forms.
"""

from __future__ import annotations

import math
from typing import Any

from polymorphd.models.core.cost import block_flops, count_params, embed_flops, full_flops, gflops, lora_flops
from polymorphd.models.nn.lora import ContextAdapter
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig
from polymorphd.models.train.presets import Preset


def map_definition(split: str) -> str:
    return (
        "mAP is the macro-averaged average precision (sklearn's step-wise AP, no interpolation) over the "
        f"classes with at least one positive frame in the evaluated split ({split!r}); adapter rows average "
        "only over that context's classes."
    )


def label_definition(report_split: str, calibration_split: str) -> str:
    return (
        "Label F1 is the mean over frames of the F1 between the predicted label set and the truth (1 when both "
        f"are empty), exact match the share of frames whose set equals the truth, on the {report_split!r} "
        "split: what subscribers receive, where mAP only ranks scores. The generalist predicts the classes "
        "above its calibrated class thresholds (the manifest's), each exit variant those above its own "
        f"decision thresholds; both sets of thresholds are fit on the {calibration_split!r} split."
    )


def cost_summary(vit_cfg: ViTConfig, preset: Preset) -> dict[str, float]:
    """GFLOPs per frame of a trunk block, a tail block with one adapter's LoRA deltas, and the whole generalist."""
    lora = preset.lora_config()
    return {
        "embed": gflops(embed_flops(vit_cfg)),
        "trunk_block": gflops(block_flops(vit_cfg)),
        "tail_block": gflops(block_flops(vit_cfg) + lora_flops(vit_cfg, lora) / lora.last_blocks),
        "full": gflops(full_flops(vit_cfg)),
    }


def param_summary(vit: VisionTransformer, preset: Preset) -> dict[str, int]:
    a = ContextAdapter(vit.cfg, preset.lora_config())
    return {
        "backbone": count_params(vit),
        "adapter_lora": sum(p.numel() for p in a.lora_A.values()) + sum(p.numel() for p in a.lora_B.values()),
        "adapter_head": count_params(a.head),
    }


def build_report(
    *,
    meta: dict[str, Any],
    records: dict[str, dict[str, Any]],
    vit: VisionTransformer,
    preset: Preset,
    generalist_labels: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Assemble the report from stage records (``{stage: {"seconds": s, "result": {...}}}``) and the
    generalist's ``label_quality`` on the report split at the calibrated class thresholds (known only once
    calibration ran, so measured by the report step rather than recorded by a stage)."""
    res = {k: v.get("result", {}) for k, v in records.items()}
    timings = {k: round(float(v["seconds"]), 2) for k, v in records.items()}
    timings["total"] = round(sum(timings.values()), 2)
    calib = res.get("calibration", {})
    return {
        "preset": preset.name,
        **meta,
        "map_definition": map_definition(meta["splits"]["report"]["name"]),
        "label_definition": label_definition(
            meta["splits"]["report"]["name"], meta["splits"]["calibration"]["name"]
        ),
        "generalist": res.get("generalist", {}) | _finite(generalist_labels or {}),
        "exits": res.get("exits", {}).get("variants", []),
        "copycat": {
            "label_weight": preset.copycat_label_weight,
            "distill_weight": preset.copycat_distill_weight,
            "temperature": preset.copycat_temperature,
            "augmented_views": preset.exit_views,
            "loss": "label_weight * BCE(z, labels) + distill_weight * T^2 * BCE(z / T, sigmoid(z_final / T))",
        },
        "contexts": res.get("contexts", {}).get("contexts", []),
        "coverage": res.get("contexts", {}).get("coverage", {}),
        "coverage_report_split": res.get("contexts", {}).get("coverage_report", {}),
        "adapters": res.get("adapters", {}).get("adapters", []),
        **({"recipe": res["adapters"]["recipe"]} if "recipe" in res.get("adapters", {}) else {}),
        "calibration": {
            "exits": calib.get("exits", []),
            "tolerance": calib.get("tolerance"),
            "confidence": calib.get("confidence"),
        },
        "gflops": cost_summary(vit.cfg, preset),
        "params": param_summary(vit, preset),
        "timings": timings,
    }


def _finite(d: dict[str, float]) -> dict[str, float | None]:
    return {k: float(v) if math.isfinite(v) else None for k, v in d.items()}


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if 0 < abs(x) < 0.01 else f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return [*out, ""]


def render_markdown(r: dict[str, Any]) -> str:
    s = r["splits"]
    # calibrate_exit's statistics (exit rate and its quality measure), whatever it reports
    stat_keys = sorted(
        {k for e in r["calibration"]["exits"] for k in e} - {"after_block", "lo", "hi", "logit_offsets"}
    )
    lines = [
        f"# Training report: preset `{r['preset']}`",
        "",
        f"Dataset `{r['dataset']}`, {r['num_classes']} classes. Train: {s['train']['frames']} frames "
        f"({s['train']['videos']} videos); calibration: `{s['calibration']['name']}` {s['calibration']['frames']} "
        f"frames; report: `{s['report']['name']}` {s['report']['frames']} frames.",
        "",
        r["map_definition"],
        "",
        r.get("label_definition", ""),
        "",
        "## Generalist",
        "",
        *_table(
            ["mAP (report)", "label F1 (report)", "exact match (report)", "mAP (calibration)", "epochs",
             "best epoch (calibration mAP)"],
            [[r["generalist"].get(k) for k in ("map", "label_f1", "exact_match", "map_calibration", "epochs",
                                               "best_epoch")]],
        ),
        "## Exits (backbone frozen)",
        "",
        f"Copycat: {r['copycat']['loss']} with label_weight {r['copycat']['label_weight']}, "
        f"distill_weight {r['copycat']['distill_weight']}, T {r['copycat']['temperature']} (z: exit logits, "
        "z_final: the frozen generalist's). Deployed: SL-ViT with copycat. Every variant trains the same "
        f"fixed epochs on the same cached trunk tokens: the clean training frames and "
        f"{r['copycat']['augmented_views']} augmented views of each, with the generalist's answer on every view.",
        "",
        *_table(
            ["after block", "kind", "copycat", "mAP", "label F1", "exact match", "mAP (calibration)", "GFLOPs",
             "params"],
            [
                [e["after_block"], e["kind"], e["copycat"], e["map"], e.get("label_f1"), e.get("exact_match"),
                 e.get("map_calibration"), e["gflops"], e["params"]]
                for e in r["exits"]
            ],
        ),
        "## Calibration",
        "",
        *_table(
            ["exit after block", "lo", "hi", *stat_keys],
            [[e["after_block"], e["lo"], e["hi"], *(e.get(k) for k in stat_keys)] for e in r["calibration"]["exits"]],
        ),
        "## Contexts and adapters",
        "",
        "Coverage (share of train frames whose labels <= k contexts cover): "
        + ", ".join(f"k={k}: {_f(v, 3)}" for k, v in r["coverage"].items()),
        "",
        *_table(
            ["context", "classes", "mAP generalist", "mAP adapter"],
            [[a["context"], " ".join(map(str, a["classes"])), a["map_generalist"], a["map_adapter"]] for a in r["adapters"]],
        ),
        "## Cost (GFLOPs per frame) and parameters",
        "",
        *_table(list(r["gflops"]), [list(r["gflops"].values())]),
        *_table(list(r["params"]), [list(r["params"].values())]),
        "## Wall time (seconds)",
        "",
        *_table(list(r["timings"]), [[f"{v:.1f}" for v in r["timings"].values()]]),
    ]  # fmt: skip
    return "\n".join(lines)
