"""Which graphs and tensor files a bundle gets (docs/bundle.md): one ``GraphSpec`` per ONNX file.

Graphs are cut at the backbone's block seams (``VisionTransformer.forward_blocks``): segments end at every
exit and at the LoRA tail start, so the torch model and the bundle share one decomposition. The graph
modules themselves are the model's (``models/nn/graphs.py``); a spec adds the file's input and output
names, its dynamic dims and how to make random inputs for it, which ``export.onnx`` exports and checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.lora_targets import TARGETS
from polymorphd.models.core.melspec import MelConfig
from polymorphd.models.nn.audio import AudioVisualExit, CountHead, MelFrontEnd
from polymorphd.models.nn.graphs import AudioExit, Probs, Segment, Tail, TailCount, TailLora, TailWeights
from polymorphd.models.nn.lora import ContextAdapter, LoraName, tail_start
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train.run import Run

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GraphSpec:
    """One bundle graph: the module to export and how to make inputs for it."""

    name: str  # file stem, e.g. "segment_0"
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: dim name}
    make_inputs: Callable[[int, torch.Generator], Inputs]  # (batch, generator) -> named inputs

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def segment_bounds(run: Run) -> list[tuple[int, int]]:
    """Block ranges of the trunk segments: cut at every exit, ending at the tail start."""
    t = tail_start(run.vit_config, run.lora)
    cuts = [e.after_block for e in run.exit_configs]
    if cuts != sorted(set(cuts)):
        raise ConfigError(f"exits must sit after strictly increasing blocks, got after_block {cuts}")
    if cuts and cuts[-1] > t:
        raise ConfigError(
            f"exit after block {cuts[-1]} sits past the LoRA tail start {t}: exits must be at or before "
            f"block {t} (retrain with lora.last_blocks <= {run.vit_config.depth - cuts[-1]})"
        )
    ends = cuts if cuts and cuts[-1] == t else [*cuts, t]
    if ends[0] == 0:
        raise ConfigError("the first segment would be empty: tail start is 0 and there are no exits")
    return list(zip([0, *ends[:-1]], ends, strict=True))


def segment_output(i: int) -> str:
    """ONNX forbids an output named like an input, so segments after the first output ``tokens_out``."""
    return "tokens" if i == 0 else "tokens_out"


def lora_names(run: Run) -> list[LoraName]:
    """LoRA tensor names in graph input order (block-major, the config's target order)."""
    t = tail_start(run.vit_config, run.lora)
    return [LoraName(b, tg) for b in range(t, run.vit_config.depth) for tg in run.lora.targets]


def tail_linear_names(run: Run) -> list[LoraName]:
    """Every linear of the tail blocks, in tail_weights.onnx's input order (block-major, forward order)."""
    t = tail_start(run.vit_config, run.lora)
    return [LoraName(b, tg) for b in range(t, run.vit_config.depth) for tg in TARGETS]


def adapter_tensors(adapter: ContextAdapter) -> dict[str, np.ndarray]:
    """An adapter as bundle tensors: lora_A (1, r, in), lora_B (1, out, r) with the scale folded in, head."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for n in adapter.param_names():
            out[f"lora_A.{n.onnx}"] = _np(adapter.lora_A[n.key].unsqueeze(0))
            out[f"lora_B.{n.onnx}"] = _np((adapter.lora_B[n.key] * adapter.cfg.scale).unsqueeze(0))
        out["head_w"] = _np(adapter.head.weight.unsqueeze(0))
        out["head_b"] = _np(adapter.head.bias.unsqueeze(0))
    return out


def tail_base_tensors(run: Run) -> dict[str, np.ndarray]:
    """The adapters' base tail weights (``run.lora_base``) under tail_weights.onnx's input names (the merged
    baseline adds deltas), and the generalist's head."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for n in tail_linear_names(run):
            layer = run.lora_base.blocks[n.block].get_submodule(n.target)
            out[f"w.{n.onnx}"] = _np(layer.weight)
            out[f"b.{n.onnx}"] = _np(layer.bias)
        out["head_w"] = _np(run.vit.head.weight)
        out["head_b"] = _np(run.vit.head.bias)
    return out


def plan_graphs(run: Run) -> list[GraphSpec]:
    """Every graph of a full bundle, in file order (segments, exits, tail, tail_lora, tail_weights)."""
    cfg = run.vit_config
    n_tok, c, s = cfg.num_tokens, cfg.embed_dim, cfg.img_size
    t = tail_start(cfg, run.lora)
    batch = {0: "B"}

    def tokens(b: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(b, n_tok, c, generator=g)

    def image(b: int, g: torch.Generator) -> Inputs:
        return {"image": torch.randn(b, cfg.in_chans, s, s, generator=g)}

    def on_tokens(name: str, module: nn.Module, output: str = "probs") -> GraphSpec:
        return GraphSpec(
            name, module, ("tokens",), (output,), {"tokens": batch}, lambda b, g: {"tokens": tokens(b, g)}
        )

    specs: list[GraphSpec] = []
    for i, (start, end) in enumerate(segment_bounds(run)):
        seg = Segment(run.vit, start, end)
        if start == 0:
            specs.append(GraphSpec("segment_0", seg, ("image",), ("tokens",), {"image": batch}, image))
        else:
            specs.append(on_tokens(f"segment_{i}", seg, segment_output(i)))
    specs += [on_tokens(f"exit_{i}", Probs(ex)) for i, ex in enumerate(run.exits)]
    specs.append(on_tokens("tail", Tail(run.vit, t)))

    names = lora_names(run)
    lora_inputs = [f"lora_{ab}.{n.onnx}" for n in names for ab in "AB"]
    adapters = run.adapters

    def lora_make(m: int, g: torch.Generator) -> Inputs:
        # rows cycle through the run's adapters, perturbed so every row differs
        rows = [adapter_tensors(adapters[i % len(adapters)]) for i in range(m)]
        out = {"tokens": tokens(1, g)}
        for key in [*lora_inputs, "head_w", "head_b"]:
            stacked = torch.from_numpy(np.concatenate([r[key] for r in rows]))
            out[key] = stacked + 0.01 * torch.randn(stacked.shape, generator=g)
        return out

    specs.append(
        GraphSpec(
            "tail_lora",
            TailLora(run.lora_base, t, names),
            ("tokens", *lora_inputs, "head_w", "head_b"),
            ("probs",),
            {k_: {0: "M"} for k_ in [*lora_inputs, "head_w", "head_b"]},
            lora_make,
        )
    )

    lin = tail_linear_names(run)
    weight_inputs = [f"{wb}.{n.onnx}" for n in lin for wb in "wb"]
    base = tail_base_tensors(run)

    def weights_make(b: int, g: torch.Generator) -> Inputs:
        out = {"tokens": tokens(b, g)}
        for key in [*weight_inputs, "head_w", "head_b"]:
            w = torch.from_numpy(base[key])
            out[key] = w + 0.01 * torch.randn(w.shape, generator=g)
        return out

    specs.append(
        GraphSpec(
            "tail_weights",
            TailWeights(run.lora_base, t, lin),
            ("tokens", *weight_inputs, "head_w", "head_b"),
            ("probs",),
            {"tokens": batch},
            weights_make,
        )
    )
    if run.avexits is not None:
        specs += audio_exit_graphs(run)
    return specs


def audio_exit_graphs(run: Run) -> list[GraphSpec]:
    """A bundle's audiovisual exits, ``av_exit_i`` (tokens, mel -> probs, count): the exit graphs of
    ``audio_graphs`` only. The daemon computes the log-mel in numpy (faster than the ``mel`` graph,
    bench/results/audio_frontend.json) and answers the final's count from the last exit, so neither the mel
    front end nor the final count head (a second generalist tail per frame) goes into the bundle."""
    av = run.avexits
    assert av is not None
    specs = audio_graphs(run.vit, av.exits, av.final_count, tail_start(run.vit_config, run.lora), av.mel)
    return [replace(s, name=f"av_{s.name}") for s in specs if s.name.startswith("exit_")]


def audio_graphs(
    vit: VisionTransformer, exits: list[AudioVisualExit], count: CountHead, start: int, mel: MelConfig
) -> list[GraphSpec]:
    """The audiovisual graphs: ``mel`` (audio window -> log-mel), ``exit_i`` (tokens, mel -> probs, count) and
    ``tail_count`` (tokens -> probs, count: the generalist tail with the final block's count head)."""
    cfg = vit.cfg
    batch = {0: "B"}

    def tokens(b: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(b, cfg.num_tokens, cfg.embed_dim, generator=g)

    def exit_inputs(b: int, g: torch.Generator) -> Inputs:
        # log-mel values of real audio lie in about [-14, 6]
        return {"tokens": tokens(b, g), "mel": torch.randn(b, mel.n_mels, mel.frames, generator=g) * 4 - 4}

    specs = [
        GraphSpec(
            "mel", MelFrontEnd(mel), ("audio",), ("mel",), {"audio": batch},
            lambda b, g: {"audio": (torch.rand(b, mel.samples, generator=g) - 0.5) * 0.5},
        ),
    ]  # fmt: skip
    specs += [
        GraphSpec(f"exit_{i}", AudioExit(ex), ("tokens", "mel"), ("probs", "count"), {"tokens": batch, "mel": batch},
                  exit_inputs)
        for i, ex in enumerate(exits)
    ]  # fmt: skip
    specs.append(
        GraphSpec(
            "tail_count", TailCount(vit, start, count), ("tokens",), ("probs", "count"), {"tokens": batch},
            lambda b, g: {"tokens": tokens(b, g)},
        )
    )  # fmt: skip
    return specs


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())
