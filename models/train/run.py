"""A training run directory: what ``polymorphd train`` writes and ``polymorphd export`` reads.

```
RUN/
  config.json        {"vit": ViTConfig, "lora": LoRAConfig, "exits": [ExitConfig] (deployed, in block order),
                      "input": InputSpec, "classes": [names], "class_ids": [ints], "preset": str, ...}
  backbone.pt        generalist VisionTransformer state dict (timm names, head included)
  exits.pt           [state dict] per deployed exit, same order as config["exits"]
  contexts.json      {"contexts": [[class indices]], "coverage": {"1": .., "2": .., "3": ..}}
  adapters.pt        [state dict] per context (ContextAdapter), same order as contexts
  calibration.json   {"class_thresholds": [K floats], "exits": [{"lo": .., "hi": .., "logit_offsets": [K]}],
                      "policy": {...}}; load_run folds each exit's logit_offsets into its head bias
  report.json, report.md
  stages.json        completed stages, so an interrupted run resumes where it stopped
```

Checkpoints carry the configs needed to rebuild every module (nanoGPT's ``model_args``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymorphd.models.core.errors import CheckpointError
from polymorphd.models.nn.exits import ExitConfig, build_exit
from polymorphd.models.nn.lora import ContextAdapter, LoRAConfig
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig


@dataclass
class Run:
    """Everything export needs, as live torch modules (eval mode, frozen)."""

    path: Path
    config: dict[str, Any]
    vit: VisionTransformer
    exits: list[torch.nn.Module]
    exit_configs: list[ExitConfig]
    lora: LoRAConfig
    contexts: list[list[int]]
    adapters: list[ContextAdapter]
    calibration: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def vit_config(self) -> ViTConfig:
        return self.vit.cfg


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written file behind."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


def save_torch(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"run file {path} is missing: is the run complete? (re-run polymorphd train)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"run file {path} is not valid JSON: {exc}") from exc


def _load_state(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"run file {path} is missing: is the run complete? (re-run polymorphd train)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run(path: str | os.PathLike, *, fused_attn: bool = False) -> Run:
    """Rebuild every module of a finished run (``fused_attn=False`` gives export-friendly attention)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist")
    cfg = read_json(path / "config.json")
    vit_cfg = ViTConfig(**cfg["vit"])
    lora_cfg = LoRAConfig(**{**cfg["lora"], "targets": tuple(cfg["lora"]["targets"])})
    vit = VisionTransformer(vit_cfg, fused_attn=fused_attn)
    vit.load_state_dict(_load_state(path / "backbone.pt"))
    exit_cfgs = [ExitConfig(**e) for e in cfg["exits"]]
    exit_states = _load_state(path / "exits.pt")
    if len(exit_states) != len(exit_cfgs):
        raise CheckpointError(
            f"{path / 'exits.pt'} holds {len(exit_states)} exits, config.json lists {len(exit_cfgs)}"
        )
    calibration = read_json(path / "calibration.json")
    cal_exits = calibration.get("exits", [])
    exits = []
    for i, (ec, st) in enumerate(zip(exit_cfgs, exit_states, strict=True)):
        m = build_exit(vit_cfg, ec, fused_attn=fused_attn)
        m.load_state_dict(st)
        offsets = cal_exits[i].get("logit_offsets") if i < len(cal_exits) else None
        if offsets is not None:  # the deployed exit is the calibrated one: class thresholds centred at 0.5
            if len(offsets) != vit_cfg.num_classes:
                raise CheckpointError(
                    f"{path / 'calibration.json'}: exit {i} has {len(offsets)} logit_offsets for "
                    f"{vit_cfg.num_classes} classes"
                )
            with torch.no_grad():
                m.head.bias.sub_(torch.tensor(offsets, dtype=m.head.bias.dtype))
        exits.append(m.eval())
    contexts = read_json(path / "contexts.json")["contexts"]
    adapter_states = _load_state(path / "adapters.pt")
    if len(adapter_states) != len(contexts):
        raise CheckpointError(
            f"{path / 'adapters.pt'} holds {len(adapter_states)} adapters for {len(contexts)} contexts"
        )
    adapters = []
    for st in adapter_states:
        a = ContextAdapter(vit_cfg, lora_cfg)
        a.load_state_dict(st)
        adapters.append(a.eval())
    report_path = path / "report.json"
    return Run(
        path=path,
        config=cfg,
        vit=vit.eval(),
        exits=exits,
        exit_configs=exit_cfgs,
        lora=lora_cfg,
        contexts=contexts,
        adapters=adapters,
        calibration=calibration,
        report=read_json(report_path) if report_path.exists() else {},
    )


def save_run_modules(
    path: Path,
    *,
    config: dict[str, Any],
    vit: VisionTransformer,
    exits: list[torch.nn.Module],
    contexts: list[list[int]],
    coverage: dict[str, float],
    adapters: list[ContextAdapter],
    calibration: dict[str, Any],
) -> None:
    """Write a complete run in one go (tests and tools; ``train`` writes stage by stage with the same files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", config)
    save_torch(path / "backbone.pt", vit.state_dict())
    save_torch(path / "exits.pt", [e.state_dict() for e in exits])
    write_json(path / "contexts.json", {"contexts": contexts, "coverage": coverage})
    save_torch(path / "adapters.pt", [a.state_dict() for a in adapters])
    write_json(path / "calibration.json", calibration)
