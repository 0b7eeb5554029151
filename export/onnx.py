"""torch -> ONNX, one graph per bundle file (docs/bundle.md), each checked against torch.

Graphs are cut at the backbone's block seams (``VisionTransformer.forward_blocks``) so the torch
model and the bundle share one decomposition. ``export_graph`` is timm's ``onnx_export`` pattern:
export with named inputs/outputs, ``onnx.checker``, then compare ONNX Runtime against torch on fresh
random inputs (another batch size than the example, so dynamic dims are exercised) and raise past
``ATOL``. Adapters go to ONNX Runtime's own adapter format (``onnxruntime.AdapterFormat``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.export.core.timing import interleaved_ms, session
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.nn.lora import ContextAdapter, LoraName, forward_tail, tail_start
from polymorphd.models.nn.vit import Block, VisionTransformer
from polymorphd.models.train.run import Run

log = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]
OPSET = 18
ATOL = 1e-4  # max abs difference ORT vs torch, fp32
# Chosen by measurement (docs/ARCHITECTURE.md, Export): see bench numbers there.
DEFAULT_EXPORTER: Exporter = "torchscript"
TAIL_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # every linear of a tail block

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


class _Segment(nn.Module):
    def __init__(self, vit: VisionTransformer, start: int, end: int) -> None:
        super().__init__()
        self.vit, self.start, self.end = vit, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0:
            x = self.vit.forward_embed(x)
        return self.vit.forward_blocks(x, self.start, self.end)


class _Sigmoid(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.inner(tokens))


class _Tail(nn.Module):
    def __init__(self, vit: VisionTransformer, start: int) -> None:
        super().__init__()
        self.vit, self.start = vit, start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_blocks(tokens, self.start, self.vit.cfg.depth)
        return torch.sigmoid(self.vit.forward_head(x))


class _TailLora(nn.Module):
    """Batched multi-adapter tail; inputs: tokens, (A, B) per LoRA name, head_w, head_b."""

    def __init__(self, vit: VisionTransformer, start: int, names: list[LoraName]) -> None:
        super().__init__()
        self.vit, self.start, self.names = vit, start, names

    def forward(self, tokens: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        deltas: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, n in enumerate(self.names):
            deltas.setdefault(n.block, {})[n.target] = (flat[2 * i], flat[2 * i + 1])
        head_w, head_b = flat[-2], flat[-1]
        return torch.sigmoid(forward_tail(self.vit, tokens, self.start, deltas, head_w, head_b))


class _TailWeights(nn.Module):
    """Tail whose linear weights and head are inputs: w, b per tail linear, then head_w, head_b."""

    def __init__(self, vit: VisionTransformer, start: int, names: list[LoraName]) -> None:
        super().__init__()
        self.vit, self.start, self.names = vit, start, names

    def forward(self, tokens: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        x = tokens
        for blk in range(self.start, self.vit.cfg.depth):
            w = {n.target: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(self.names) if n.block == blk}
            x = _block_with_weights(self.vit.blocks[blk], x, w)
        x = self.vit.norm(x)[:, 0]  # (B, C)
        return torch.sigmoid(F.linear(x, flat[-2], flat[-1]))


def _block_with_weights(
    blk: Block, x: torch.Tensor, w: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """``Block.forward`` (unfused attention) with its linear weights given (functional_call does not trace)."""
    a = blk.attn
    b, n, c = x.shape
    qkv = F.linear(blk.norm1(x), *w["attn.qkv"])
    q, k, v = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)
    h = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    x = x + F.linear(h.transpose(1, 2).reshape(b, n, c), *w["attn.proj"])  # (B, N, C)
    return x + F.linear(blk.mlp.act(F.linear(blk.norm2(x), *w["mlp.fc1"])), *w["mlp.fc2"])


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
    t = tail_start(run.vit_config, run.lora)
    return [LoraName(b, tg) for b in range(t, run.vit_config.depth) for tg in TAIL_TARGETS]


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
    """The generalist's tail weights under tail_weights.onnx's input names (the merged baseline adds deltas)."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for n in tail_linear_names(run):
            layer = run.vit.blocks[n.block].get_submodule(n.target)
            out[f"w.{n.onnx}"] = _np(layer.weight)
            out[f"b.{n.onnx}"] = _np(layer.bias)
        out["head_w"] = _np(run.vit.head.weight)
        out["head_b"] = _np(run.vit.head.bias)
    return out


def write_tensor_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write named fp32 tensors in ONNX Runtime's adapter format (readable with ``AdapterFormat.read_adapter``)."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(
        {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    )
    fmt.export_adapter(str(path))


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
        seg = _Segment(run.vit, start, end)
        if start == 0:
            specs.append(GraphSpec("segment_0", seg, ("image",), ("tokens",), {"image": batch}, image))
        else:
            specs.append(on_tokens(f"segment_{i}", seg, segment_output(i)))
    specs += [on_tokens(f"exit_{i}", _Sigmoid(ex)) for i, ex in enumerate(run.exits)]
    specs.append(on_tokens("tail", _Tail(run.vit, t)))

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
            _TailLora(run.vit, t, names),
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
            _TailWeights(run.vit, t, lin),
            ("tokens", *weight_inputs, "head_w", "head_b"),
            ("probs",),
            {"tokens": batch},
            weights_make,
        )
    )
    return specs


def export_graph(
    spec: GraphSpec, path: Path, *, exporter: Exporter = DEFAULT_EXPORTER, atol: float = ATOL, seed: int = 0
) -> float:
    """Export ``spec`` to ``path``, run onnx.checker, compare ORT with torch; return the max abs difference.

    Raises BundleError when ORT and torch disagree by more than ``atol``.
    """
    g = torch.Generator().manual_seed(seed)
    example = spec.make_inputs(2, g)  # a dynamic dim cannot have example size 0 or 1
    args = tuple(example[n] for n in spec.inputs)
    spec.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # tail_lora's tokens are (1, N, C) by contract, so the traced "batch is 1" branch is the right one
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript exporter is deprecated but still the faster graph here (docs/ARCHITECTURE.md)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        if exporter == "dynamo":
            # torch.export first: torch.onnx.export turns the tuple for *flat in dynamic_shapes into a list
            program = torch.export.export(
                spec.module, args, dynamic_shapes=_dynamic_shapes(spec), strict=False
            )
            torch.onnx.export(
                program,
                args,
                str(path),
                dynamo=True,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                opset_version=OPSET,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        elif exporter == "torchscript":
            torch.onnx.export(
                spec.module,
                args,
                str(path),
                dynamo=False,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic or None,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        else:
            raise ConfigError(f"exporter {exporter!r} invalid: choose 'dynamo' or 'torchscript'")
    if exporter == "dynamo":
        _name_dynamic_dims(path, spec)
    onnx.checker.check_model(str(path), full_check=True)
    return check_graph(spec, path, atol=atol, seed=seed + 1)


def _dynamic_shapes(spec: GraphSpec) -> tuple[object, ...] | dict[str, object]:
    """torch.export dims, positional: one shared ``Dim`` per dim name (B or M)."""
    dims: dict[str, object] = {}
    out = []
    for name in spec.inputs:
        axes = spec.dynamic.get(name)
        out.append({ax: dims.setdefault(d, torch.export.Dim(d)) for ax, d in axes.items()} if axes else None)
    if len(out) > 1:  # forward(tokens, *flat): torch.export sees two arguments, the second a tuple
        return {"tokens": out[0], "flat": tuple(out[1:])}
    return tuple(out)


def _name_dynamic_dims(path: Path, spec: GraphSpec) -> None:
    """torch.export names dynamic dims after its symbols (s52): rename them to the contract's B / M."""
    model = onnx.load(str(path))
    rename = {}
    for inp in model.graph.input:
        for ax, name in spec.dynamic.get(inp.name, {}).items():
            rename[inp.type.tensor_type.shape.dim[ax].dim_param] = name
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    onnx.save(model, str(path))


def check_graph(spec: GraphSpec, path: Path, *, atol: float = ATOL, seed: int = 1, batch: int = 3) -> float:
    """ORT vs torch on fresh random inputs; raise BundleError naming the graph when they differ past ``atol``."""
    feeds = spec.make_inputs(batch, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = spec.module(*(feeds[n] for n in spec.inputs)).numpy()
    sess = session(path)
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    if got.shape != want.shape:
        raise BundleError(f"{path.name}: ONNX Runtime output shape {got.shape} != torch {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float32) - want))) if want.size else 0.0
    if not diff <= atol:
        raise BundleError(
            f"{path.name}: ONNX Runtime differs from torch by {diff:.3g} (tolerance {atol:g}) on random "
            f"inputs of batch {batch}: the exported graph is wrong; try the other exporter"
        )
    return diff


def compare_exporters(
    run: Run, out_dir: Path, *, runs: int = 50, blocks: int = 5, threads: int = 2
) -> dict[str, dict[str, float]]:
    """Export every graph with both exporters and time each in ORT (median of interleaved blocks, B=1, M=2).

    Returns graph -> {"<exporter>_ms": .., "<exporter>_export_s": ..}; how DEFAULT_EXPORTER was chosen.
    """
    out: dict[str, dict[str, float]] = {}
    exporters: tuple[Exporter, ...] = ("torchscript", "dynamo")
    for spec in plan_graphs(run):
        row: dict[str, float] = {}
        sessions = {}
        for e in exporters:
            (out_dir / e).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            export_graph(spec, out_dir / e / spec.file, exporter=e)
            row[f"{e}_export_s"] = round(time.perf_counter() - t0, 2)
            sessions[e] = session(out_dir / e / spec.file, threads)
        feeds = numpy_feeds(spec, 2 if spec.name == "tail_lora" else 1)
        ms = interleaved_ms({e: (sessions[e], feeds) for e in exporters}, runs, blocks)
        out[spec.name] = {**row, **{f"{e}_ms": round(v, 4) for e, v in ms.items()}}
    return out


def numpy_feeds(spec: GraphSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in spec.make_inputs(batch, torch.Generator().manual_seed(seed)).items()}


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())
