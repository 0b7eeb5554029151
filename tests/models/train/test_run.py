"""The run directory: one save and one load per artifact, named only in models/train/run.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from polymorphd.models.core.errors import CheckpointError  # noqa: E402
from polymorphd.models.nn.exits import ExitConfig  # noqa: E402
from polymorphd.models.nn.lora import LoRAConfig  # noqa: E402
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig  # noqa: E402
from polymorphd.models.train import run  # noqa: E402


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_docstring_documents_every_file_of_the_layout() -> None:
    assert len(set(run.FILES)) == len(run.FILES)
    assert all(name in run.__doc__ for name in run.FILES)


def test_each_artifact_saved_loads_back_as_it_was(tiny_run: Path, tmp_path: Path) -> None:
    cfg = run.load_config(tiny_run)
    vit_cfg = ViTConfig(**cfg["vit"])
    lora_cfg = LoRAConfig(**{**cfg["lora"], "targets": tuple(cfg["lora"]["targets"])})
    exit_cfgs = [ExitConfig(**e) for e in cfg["exits"]]
    vit = run.load_backbone(tiny_run, VisionTransformer(vit_cfg))
    exits = run.load_exits(tiny_run, vit_cfg, exit_cfgs)
    contexts = run.load_contexts(tiny_run)
    adapters = run.load_adapters(tiny_run, vit_cfg, lora_cfg, len(contexts))
    calibration = run.load_calibration(tiny_run)

    out = tmp_path / "copy"
    assert not run.has_config(out)
    run.save_config(out, cfg)  # creates the directory
    assert run.has_config(out) and run.load_config(out) == cfg
    run.save_backbone(out, vit)
    assert _same(run.load_backbone(out, VisionTransformer(vit_cfg)), vit)
    run.save_exits(out, exits)
    assert all(map(_same, run.load_exits(out, vit_cfg, exit_cfgs), exits))
    run.save_contexts(out, contexts, {"1": 1.0})
    assert run.load_contexts(out) == contexts
    run.save_adapters(out, adapters)
    assert all(map(_same, run.load_adapters(out, vit_cfg, lora_cfg, len(contexts)), adapters))
    run.save_calibration(out, calibration)
    assert run.load_calibration(out) == calibration
    assert run.load_report(out) == {}  # a run written without a report (tests, tools) still loads
    run.save_report(out, {"preset": "tiny"}, "# report")
    assert run.load_report(out) == {"preset": "tiny"}
    assert sorted(p.name for p in out.iterdir()) == sorted(set(run.FILES) - {run.STAGE_LOG})
    assert run.load_run(out).report == {"preset": "tiny"}


def test_missing_or_inconsistent_files_are_named(tiny_run: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(tiny_run, tmp_path / "broken"))
    (out / run.ADAPTERS).unlink()
    with pytest.raises(CheckpointError, match=rf"{run.ADAPTERS} is missing: is the run complete\?"):
        run.load_run(out)
    run.save_adapters(out, run.load_run(tiny_run).adapters[:1])
    with pytest.raises(CheckpointError, match=rf"{run.ADAPTERS} holds 1 adapters for 3 contexts"):
        run.load_run(out)
    r = run.load_run(tiny_run)
    run.save_exits(out, r.exits[:1])
    with pytest.raises(CheckpointError, match=rf"{run.EXITS} holds 1 exits, {run.CONFIG} lists 2"):
        run.load_run(out)
    (out / run.CALIBRATION).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{run.CALIBRATION} is not valid JSON"):
        run.load_calibration(out)
    with pytest.raises(CheckpointError, match="does not exist"):
        run.load_run(tmp_path / "nope")


def test_load_run_centres_each_exit_on_its_calibrated_offsets(tiny_run: Path) -> None:
    r = run.load_run(tiny_run)
    raw = run.load_exits(tiny_run, r.vit_config, r.exit_configs, fused_attn=False)
    for i, (calibrated, trained) in enumerate(zip(r.exits, raw, strict=True)):
        offsets = torch.tensor(r.calibration["exits"][i]["logit_offsets"])
        assert torch.allclose(calibrated.head.bias, trained.head.bias - offsets)


def test_stage_log_persists_only_where_asked(tmp_path: Path) -> None:
    tmp_path.joinpath("a").mkdir()
    log = run.StageLog(tmp_path / "a", write=True)
    assert not log.done("generalist")
    log.record("generalist", 1.23456, {"map": 0.5})
    again = run.StageLog(tmp_path / "a", write=False)
    assert again.done("generalist") and again.records["generalist"]["result"] == {"map": 0.5}
    assert again.records["generalist"]["seconds"] == 1.235
    again.record("exits", 1.0, {})  # a rank other than 0 keeps its records in memory only
    stored = json.loads((tmp_path / "a" / run.STAGE_LOG).read_text())
    assert list(stored["stages"]) == ["generalist"]
