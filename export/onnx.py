"""torch -> ONNX, one graph per bundle file (docs/bundle.md), each checked against torch.

``export_graph`` is timm's ``onnx_export`` pattern: export a ``GraphSpec`` (``export.plan``) with named
inputs/outputs, ``onnx.checker``, then compare ONNX Runtime against torch on fresh random inputs (another
batch size than the example, so dynamic dims are exercised) and raise past ``ATOL``. Tensor files (adapters,
tail_base) go to ONNX Runtime's own adapter format (``onnxruntime.AdapterFormat``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from polymorphd.export.core.timing import session
from polymorphd.export.plan import GraphSpec
from polymorphd.models.core.errors import BundleError, ConfigError

Exporter = Literal["dynamo", "torchscript"]
OPSET = 18
ATOL = 1e-4  # max abs difference ORT vs torch, fp32
# Chosen by measurement (docs/ARCHITECTURE.md, Export): see bench numbers there.
DEFAULT_EXPORTER: Exporter = "torchscript"


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
        out = spec.module(*(feeds[n] for n in spec.inputs))
    wants = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]  # every output is compared
    sess = session(path)
    gots = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    worst = 0.0
    for name, got, want in zip(spec.outputs, gots, wants, strict=True):
        if got.shape != want.shape:
            raise BundleError(
                f"{path.name}: ONNX Runtime output {name!r} shape {got.shape} != torch {want.shape}"
            )
        diff = float(np.max(np.abs(got.astype(np.float32) - want))) if want.size else 0.0
        if not diff <= atol:
            raise BundleError(
                f"{path.name}: ONNX Runtime differs from torch by {diff:.3g} (tolerance {atol:g}) in output "
                f"{name!r} on random inputs of batch {batch}: the exported graph is wrong; try the other exporter"
            )
        worst = max(worst, diff)
    return worst


def write_tensor_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write named fp32 tensors in ONNX Runtime's adapter format (readable with ``AdapterFormat.read_adapter``)."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(
        {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    )
    fmt.export_adapter(str(path))
