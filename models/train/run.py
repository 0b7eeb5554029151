"""A training run directory: its layout, and one save and one load per artifact.

``polymorphd train`` writes it stage by stage, ``polymorphd export`` reads it
(``load_run``); this module is the only one that spells its file names.

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
  avexits.pt         optional (train --audio): {"mel": MelConfig, "exits": [{"config": ExitConfig, "state": ..,
                      "lo": .., "hi": .., "logit_offsets": [K], "count_margin": ..}], "final_count": state dict}
                      the audiovisual exits with count heads, one per deployed exit position, calibrated
  report.json, report.md
  stages.json        completed stages, so an interrupted run resumes where it stopped
```

Checkpoints carry the configs needed to rebuild every module (nanoGPT's ``model_args``).
Every write is atomic (temporary file, then ``os.replace``), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymorphd.models.core.errors import CheckpointError
from polymorphd.models.core.melspec import MelConfig
from polymorphd.models.nn.audio import AudioVisualExit, CountHead
from polymorphd.models.nn.exits import ExitConfig, build_exit
from polymorphd.models.nn.lora import ContextAdapter, LoRAConfig
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

# The layout: the one place these names are written.
CONFIG = "config.json"
BACKBONE = "backbone.pt"
EXITS = "exits.pt"
CONTEXTS = "contexts.json"
ADAPTERS = "adapters.pt"
CALIBRATION = "calibration.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
STAGE_LOG = "stages.json"
# polymorph recipe only: the frozen backbone the adapters are relative to (the backbone file holds the
# generalist, its LoRA merged); absent, the adapters are relative to the backbone file
ADAPTER_BASE = "adapter_base.pt"
AVEXITS = "avexits.pt"  # optional: only runs trained with audio have it, so it is not in FILES
FILES = (CONFIG, BACKBONE, EXITS, CONTEXTS, ADAPTERS, CALIBRATION, REPORT_JSON, REPORT_MD, STAGE_LOG)

Device = str | torch.device


@dataclass
class AvExits:
    """The audiovisual exits of a run trained with audio: calibrated (logit offsets folded into the heads)."""

    mel: MelConfig
    exits: list[AudioVisualExit]  # one per deployed exit position, in block order
    calibration: list[dict[str, Any]]  # per exit: lo, hi, logit_offsets, count_margin
    final_count: CountHead


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
    adapter_base: VisionTransformer | None = None  # ADAPTER_BASE when the run has one
    avexits: AvExits | None = None  # audiovisual exits + count heads (runs trained with --audio)

    @property
    def vit_config(self) -> ViTConfig:
        return self.vit.cfg

    @property
    def lora_base(self) -> VisionTransformer:
        """The model whose tail weights the adapters' LoRA deltas are added to."""
        return self.adapter_base if self.adapter_base is not None else self.vit


# --- atomic files ---------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written file behind."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
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


def _load_state(path: Path, device: Device = "cpu") -> Any:
    if not path.exists():
        raise CheckpointError(f"run file {path} is missing: is the run complete? (re-run polymorphd train)")
    return torch.load(path, map_location=device, weights_only=True)


# --- one save and one load per artifact, in stage order -----------------------------------------------


def has_config(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run already (it is then resumed, never overwritten)."""
    return (Path(run_dir) / CONFIG).exists()


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Create the run directory with its config (the first file of a run)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG, config)


def load_config(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / CONFIG)


def save_backbone(run_dir: Path, vit: VisionTransformer) -> None:
    save_torch(Path(run_dir) / BACKBONE, vit.state_dict())


def load_backbone(run_dir: Path, vit: VisionTransformer, device: Device = "cpu") -> VisionTransformer:
    """Load the saved generalist's weights into ``vit`` (built from the run's config); returns it."""
    vit.load_state_dict(_load_state(Path(run_dir) / BACKBONE, device))
    return vit


def save_adapter_base(run_dir: Path, vit: VisionTransformer) -> None:
    save_torch(Path(run_dir) / ADAPTER_BASE, vit.state_dict())


def load_adapter_base(run_dir: Path, vit: VisionTransformer, device: Device = "cpu") -> VisionTransformer:
    """Load the frozen base of a polymorph-recipe run into ``vit``; returns it."""
    vit.load_state_dict(_load_state(Path(run_dir) / ADAPTER_BASE, device))
    return vit


def save_exits(run_dir: Path, exits: Sequence[torch.nn.Module]) -> None:
    """The deployed exits, in the order of config["exits"]."""
    save_torch(Path(run_dir) / EXITS, [m.state_dict() for m in exits])


def load_exits(
    run_dir: Path,
    vit_cfg: ViTConfig,
    exit_cfgs: Sequence[ExitConfig],
    device: Device = "cpu",
    *,
    fused_attn: bool = True,
) -> list[torch.nn.Module]:
    """The saved exits as trained (eval mode), one per config; ``load_run`` adds calibration."""
    path = Path(run_dir) / EXITS
    states = _load_state(path, device)
    if len(states) != len(exit_cfgs):
        raise CheckpointError(f"{path} holds {len(states)} exits, {CONFIG} lists {len(exit_cfgs)}")
    exits = []
    for ec, st in zip(exit_cfgs, states, strict=True):
        m = build_exit(vit_cfg, ec, fused_attn=fused_attn).to(device)
        m.load_state_dict(st)
        exits.append(m.eval())
    return exits


def save_contexts(run_dir: Path, contexts: list[list[int]], coverage: dict[str, float]) -> None:
    write_json(Path(run_dir) / CONTEXTS, {"contexts": contexts, "coverage": coverage})


def load_contexts(run_dir: Path) -> list[list[int]]:
    return read_json(Path(run_dir) / CONTEXTS)["contexts"]


def save_adapters(run_dir: Path, adapters: Sequence[ContextAdapter]) -> None:
    """One adapter per context, in the order of the saved contexts."""
    save_torch(Path(run_dir) / ADAPTERS, [a.state_dict() for a in adapters])


def load_adapters(
    run_dir: Path, vit_cfg: ViTConfig, lora_cfg: LoRAConfig, num_contexts: int, device: Device = "cpu"
) -> list[ContextAdapter]:
    path = Path(run_dir) / ADAPTERS
    states = _load_state(path, device)
    if len(states) != num_contexts:
        raise CheckpointError(f"{path} holds {len(states)} adapters for {num_contexts} contexts")
    adapters = []
    for st in states:
        a = ContextAdapter(vit_cfg, lora_cfg).to(device)
        a.load_state_dict(st)
        adapters.append(a.eval())
    return adapters


def save_avexits(
    run_dir: Path,
    mel: MelConfig,
    exits: Sequence[AudioVisualExit],
    calibration: Sequence[dict[str, Any]],
    final_count: CountHead,
) -> None:
    """The audiovisual exits as trained (their calibration beside them, not folded in)."""
    if len(exits) != len(calibration):
        raise ValueError(f"{len(exits)} audiovisual exits but {len(calibration)} calibrations")
    save_torch(
        Path(run_dir) / AVEXITS,
        {
            "mel": asdict(mel),
            "exits": [
                {"config": m.cfg.to_dict(), "state": m.state_dict(), **cal}
                for m, cal in zip(exits, calibration, strict=True)
            ],
            "final_count": final_count.state_dict(),
        },
    )


def load_avexits(
    run_dir: Path, vit_cfg: ViTConfig, device: Device = "cpu", *, fused_attn: bool = True
) -> AvExits | None:
    """The run's audiovisual exits with each exit's logit_offsets folded into its head bias (as ``load_run``
    does for the visual exits), or None for a run trained without audio."""
    path = Path(run_dir) / AVEXITS
    if not path.exists():
        return None
    saved = _load_state(path, device)
    try:
        mel = MelConfig(**saved["mel"])
        exits, cal = [], []
        for e in saved["exits"]:
            m = AudioVisualExit(vit_cfg, ExitConfig(**e["config"]), mel, fused_attn=fused_attn).to(device)
            m.load_state_dict(e["state"])
            offsets = e["logit_offsets"]
            if len(offsets) != vit_cfg.num_classes:
                raise CheckpointError(
                    f"{path}: an exit has {len(offsets)} logit_offsets for {vit_cfg.num_classes} classes"
                )
            with torch.no_grad():
                m.head.bias.sub_(torch.tensor(offsets, dtype=m.head.bias.dtype))
            exits.append(m.eval())
            cal.append({k: e[k] for k in ("lo", "hi", "logit_offsets", "count_margin")})
        final = CountHead(vit_cfg.embed_dim).to(device)
        final.load_state_dict(saved["final_count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: malformed audiovisual exits ({exc!r}); re-run polymorphd train --audio"
        ) from exc
    except RuntimeError as exc:  # load_state_dict: the saved tensors do not fit the exit's layers
        old = "count_head.weight" in str(exc)
        raise CheckpointError(
            f"{path}: the saved audiovisual exits do not fit this version's "
            + (
                "(their count heads are linear; since issue 14c each is an MLP behind a stop-gradient): "
                "train them again with polymorphd train --audio on the visual run"
                if old
                else f"layers ({exc})"
            )
        ) from exc
    return AvExits(mel, exits, cal, final.eval())


def save_calibration(run_dir: Path, calibration: dict[str, Any]) -> None:
    write_json(Path(run_dir) / CALIBRATION, calibration)


def load_calibration(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / CALIBRATION)


def save_report(run_dir: Path, report: dict[str, Any], markdown: str) -> None:
    """The report as data (JSON) and for people (Markdown, rendered by ``report.render_markdown``)."""
    write_json(Path(run_dir) / REPORT_JSON, report)
    write_text(Path(run_dir) / REPORT_MD, markdown + "\n")


def load_report(run_dir: Path) -> dict[str, Any]:
    """The run's report, or ``{}`` for a run written without one (tests and tools)."""
    path = Path(run_dir) / REPORT_JSON
    return read_json(path) if path.exists() else {}


class StageLog:
    """stages.json: ``{"stages": {name: {"seconds": s, "finished": t, "result": {...}}}}`` in completion order."""

    def __init__(self, run_dir: Path, write: bool) -> None:
        self.path, self.write = Path(run_dir) / STAGE_LOG, write
        self.records: dict[str, dict[str, Any]] = read_json(self.path)["stages"] if self.path.exists() else {}

    def done(self, name: str) -> bool:
        return name in self.records

    def record(self, name: str, seconds: float, result: dict[str, Any]) -> None:
        self.records[name] = {"seconds": round(seconds, 3), "finished": time.time(), "result": result}
        if self.write:
            write_json(self.path, {"stages": self.records})


# --- a whole run ----------------------------------------------------------------------------------------


def load_run(path: str | os.PathLike, *, fused_attn: bool = False) -> Run:
    """Rebuild every module of a finished run (``fused_attn=False`` gives export-friendly attention)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist")
    cfg = load_config(path)
    vit_cfg = ViTConfig(**cfg["vit"])
    lora_cfg = LoRAConfig(**{**cfg["lora"], "targets": tuple(cfg["lora"]["targets"])})
    vit = load_backbone(path, VisionTransformer(vit_cfg, fused_attn=fused_attn))
    exit_cfgs = [ExitConfig(**e) for e in cfg["exits"]]
    exits = load_exits(path, vit_cfg, exit_cfgs, fused_attn=fused_attn)
    calibration = load_calibration(path)
    cal_exits = calibration.get("exits", [])
    for i, m in enumerate(exits):
        offsets = cal_exits[i].get("logit_offsets") if i < len(cal_exits) else None
        if offsets is not None:  # the deployed exit is the calibrated one: class thresholds centred at 0.5
            if len(offsets) != vit_cfg.num_classes:
                raise CheckpointError(
                    f"{path / CALIBRATION}: exit {i} has {len(offsets)} logit_offsets for "
                    f"{vit_cfg.num_classes} classes"
                )
            with torch.no_grad():
                m.head.bias.sub_(torch.tensor(offsets, dtype=m.head.bias.dtype))
    contexts = load_contexts(path)
    return Run(
        path=path,
        config=cfg,
        vit=vit.eval(),
        exits=exits,
        exit_configs=exit_cfgs,
        lora=lora_cfg,
        contexts=contexts,
        adapters=load_adapters(path, vit_cfg, lora_cfg, len(contexts)),
        calibration=calibration,
        report=load_report(path),
        adapter_base=(
            load_adapter_base(path, VisionTransformer(vit_cfg, fused_attn=fused_attn)).eval()
            if (path / ADAPTER_BASE).is_file()
            else None
        ),
        avexits=load_avexits(path, vit_cfg, fused_attn=fused_attn),
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
    """Write a complete run in one go (tests and tools; ``train`` writes stage by stage, the same files)."""
    save_config(path, config)
    save_backbone(path, vit)
    save_exits(path, exits)
    save_contexts(path, contexts, coverage)
    save_adapters(path, adapters)
    save_calibration(path, calibration)
