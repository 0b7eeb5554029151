"""The linear layers of a ViT block, by name, and their shapes: the one owner of that fact. Torch-free.

Names are timm's submodule paths inside ``blocks.N`` (``models/nn/vit.py``), in the block's forward order.
LoRA adapts any subset of them (``LoRAConfig.targets``); ``tail_weights.onnx`` takes every one as an input.
Model code (``models/nn/lora.py``), FLOP counts (``models/core/cost.py``) and the bundle manifest and its
verification (``export/core/manifest.py``) all read the names and shapes here, so they cannot disagree.
"""

from __future__ import annotations

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def target_dims(target: str, c: int, h: int) -> tuple[int, int]:
    """(in_features, out_features) of linear ``target`` in a block of width ``c`` with MLP hidden width ``h``."""
    dims = {"attn.qkv": (c, 3 * c), "attn.proj": (c, c), "mlp.fc1": (c, h), "mlp.fc2": (h, c)}
    if target not in dims:
        raise ValueError(f"LoRA target {target!r} unknown: valid targets are {list(TARGETS)}")
    return dims[target]
