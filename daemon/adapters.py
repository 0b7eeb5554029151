"""Context adapters in memory: per-adapter arrays read once, stacked per active set for the batched tail.

Each adapter file (ONNX Runtime's adapter format) holds ``lora_A.<name>`` (1, r, in), ``lora_B.<name>``
(1, out, r) with the LoRA scale folded in, ``head_w`` (1, K, C) and ``head_b`` (1, K). The leading 1 makes
stacking M adapters a concatenation along axis 0, which is what ``tail_lora.onnx`` takes. Feeding stacked
weights as ordinary inputs runs M adapters in ONE session call; ORT's ``add_active_adapter`` path would need
M calls (see docs/ARCHITECTURE.md, "Engine"). Torch-free.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from polymorphd.models.core.errors import BundleError

log = logging.getLogger(__name__)

STACK_CACHE = 8  # active sets alternate among a few in a scene; each entry is M adapters' tensors (small)


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.onnx_adapter`` file as float32 numpy arrays (copied out of the memory map)."""
    if not path.is_file():
        raise BundleError(f"adapter file {path} does not exist")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:  # ORT raises its own error types for a corrupt flatbuffer
        raise BundleError(f"{path}: ONNX Runtime cannot read this adapter file: {exc}") from exc
    # a copy, so the arrays outlive the file's memory map (DESIGN.md pitfalls: adapters are mmapped)
    return {name: np.array(v.numpy(), dtype=np.float32, copy=True) for name, v in params.items()}


class AdapterBank:
    """Adapters of one bundle, indexed by context position (the policy's context index)."""

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        tail_inputs: Sequence[str],
        input_shapes: dict[str, list[Any]],
    ) -> None:
        contexts = manifest["contexts"]
        by_context = {int(a["context"]): a for a in manifest["adapters"]}
        self.names = [n for n in tail_inputs if n != "tokens"]  # what tail_lora.onnx needs from an adapter
        self.per: list[dict[str, np.ndarray]] = []
        for i, ctx in enumerate(contexts):
            entry = by_context.get(int(ctx["id"]))
            if entry is None:
                raise BundleError(
                    f"{root / 'manifest.json'}: context {ctx['id']} ({ctx.get('name', i)}) has no adapter; "
                    f"adapters are listed for contexts {sorted(by_context)}"
                )
            path = root / entry["file"]
            params = read_adapter_file(path)
            missing = [n for n in self.names if n not in params]
            if missing:
                raise BundleError(
                    f"{path}: tensor(s) {missing[:4]}{'...' if len(missing) > 4 else ''} not found; "
                    f"the adapter holds {sorted(params)[:6]}... (tail_lora.onnx needs {len(self.names)} tensors)"
                )
            for n in self.names:
                _check_shape(path, n, params[n], input_shapes.get(n))
            self.per.append({n: params[n] for n in self.names})
        self._cache: OrderedDict[tuple[int, ...], dict[str, np.ndarray]] = OrderedDict()
        log.info("loaded %d adapters (%d tensors each)", len(self.per), len(self.names))

    def __len__(self) -> int:
        return len(self.per)

    def stacked(self, chosen: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Feed dict for ``tail_lora`` with the chosen adapters stacked on axis 0 (cached per set).

        The caller sets ``feed["tokens"]``; the dict is reused for the next frame with the same set.
        """
        feed = self._cache.get(chosen)
        if feed is not None:
            self._cache.move_to_end(chosen)
            return feed
        if len(chosen) == 1:
            feed = dict(self.per[chosen[0]])
        else:
            feed = {n: np.concatenate([self.per[c][n] for c in chosen], axis=0) for n in self.names}
        self._cache[chosen] = feed
        if len(self._cache) > STACK_CACHE:
            self._cache.popitem(last=False)
        return feed

    def tensor(self, context: int, name: str) -> np.ndarray:
        return self.per[context][name]


def _check_shape(path: Path, name: str, arr: np.ndarray, graph_shape: list[Any] | None) -> None:
    """Leading dim 1, and every fixed graph dim after it equal (the M dim is symbolic in the graph)."""
    if arr.ndim == 0 or arr.shape[0] != 1:
        raise BundleError(f"{path}: tensor {name} has shape {arr.shape}; expected a leading dimension of 1")
    if graph_shape is None:
        return
    if len(graph_shape) != arr.ndim:
        raise BundleError(
            f"{path}: tensor {name} has rank {arr.ndim} (shape {arr.shape}); tail_lora.onnx expects {graph_shape}"
        )
    for got, want in zip(arr.shape[1:], graph_shape[1:], strict=True):
        if isinstance(want, int) and want != got:
            raise BundleError(
                f"{path}: tensor {name} has shape {arr.shape}; tail_lora.onnx expects {graph_shape}"
            )
