"""Load timm, Hugging Face (ViT, DeiT) and polymorphd checkpoints into our timm-named ViT.

``polymorphd train --init-from FILE`` starts fine-tuning from such a file. Our
parameter names are timm's, so a timm state dict loads as is; Hugging Face
checkpoints (``ViTModel``, ``ViTForImageClassification``, DeiT; the Hub's
``encoder.layer.N.attention.attention.query`` names and transformers 5's
``layers.N.attention.q_proj`` names) are renamed and their separate query, key
and value projections concatenated into timm's fused ``qkv``. A polymorphd
checkpoint is a container ``{"format": "polymorphd", "vit": ViTConfig fields,
"model": state dict}`` (nanoGPT's ``model_args``), or a run directory's
``backbone.pt`` with its ``config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymorphd.models.core.errors import CheckpointError
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

CheckpointFormat = Literal["polymorphd", "timm", "hf-vit", "hf-deit"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Training scripts wrap the weights; the first of these holding a mapping is the state dict.
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net")
# DistributedDataParallel and torch.compile prefix every name.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Inside a Hugging Face model directory, in order of preference.
_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "backbone.pt")

_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_PARTS = {
    "attention.attention.query": "q",  # the Hub's names (what save_pretrained writes)
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.q_proj": "q",  # transformers 5's in-memory names
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight",  # DeiT's class-token head
    "cls_classifier.bias": "head.bias",
}
# Not part of classification: the tanh pooler, and the masked-image-modeling token.
_HF_IGNORED = ("pooler.", "embeddings.mask_token")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read and converted to our (timm) names."""

    path: Path
    format: CheckpointFormat
    state_dict: dict[str, torch.Tensor]  # timm names
    fields: dict[str, Any]  # ViTConfig fields known from the file (num_heads only when recorded)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pt/.pth/.bin/.ckpt or .safetensors file and unwrap common containers to a state dict."""
    return unwrap_state_dict(_load_raw(Path(path)), Path(path))


def unwrap_state_dict(obj: Any, source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """``{"model": ...}``, ``{"state_dict": ...}`` and friends -> name -> tensor (wrapper prefixes removed)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, expected a dict of tensors (a state dict)"
        )
    for _ in range(3):  # containers nest: {"model": {"state_dict": ...}}
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(
            f"{source} holds no tensors (top-level keys: {sorted(map(str, obj))[:10]}): "
            f"expected a state dict, possibly under one of {list(_CONTAINER_KEYS)}"
        )
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def detect_format(state_dict: Mapping[str, Any]) -> CheckpointFormat:
    """Which naming a state dict (or a container as loaded) uses.

    Flat dicts with timm names are "timm" (our own weights use the same names);
    "polymorphd" is our container, which also carries the ViTConfig.
    """
    if _polymorphd_config(state_dict) is not None:
        return "polymorphd"
    keys = list(unwrap_state_dict(state_dict))
    if any(k.startswith("deit.") or k.endswith("embeddings.distillation_token") for k in keys):
        return "hf-deit"
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf-vit"
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise CheckpointError(
        f"unknown checkpoint format: {len(keys)} tensors, e.g. {keys[:6]}; expected timm names "
        "(patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...) or Hugging Face ViT/DeiT names "
        "(vit.embeddings.patch_embeddings.projection.weight, vit.encoder.layer.0..., deit....)"
    )


def convert_hf(
    state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Hugging Face ViT/DeiT state dict -> (state dict in timm names, ViTConfig fields)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in unwrap_state_dict(state_dict).items():
        inner = re.sub(r"^(?:vit|deit)\.", "", key)
        if inner.endswith("distillation_token") or inner.startswith("distillation_classifier."):
            raise CheckpointError(
                f"{key!r}: this is a distilled DeiT. Its distillation token attends in every block and our "
                "ViT has only the class token, so dropping it would change every output. Use a non-distilled "
                "DeiT or ViT checkpoint instead."
            )
        if inner.startswith(_HF_IGNORED):
            continue
        if inner in _HF_TOP:
            out[_HF_TOP[inner]] = t
            continue
        m = _HF_LAYER.match(inner)
        part = _HF_LAYER_PARTS.get(m.group(2)) if m else None
        if m is None or part is None:
            raise CheckpointError(
                f"unknown Hugging Face tensor {key!r} {tuple(t.shape)}: expected ViT/DeiT encoder, embedding, "
                "layernorm or classifier weights"
            )
        block, leaf = int(m.group(1)), m.group(3)
        if part in ("q", "k", "v"):
            qkv.setdefault((block, leaf), {})[part] = t
        else:
            out[f"blocks.{block}.{part}.{leaf}"] = t
    for (block, leaf), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(
                f"block {block}: attention {leaf} has {sorted(parts)} but lacks {missing}; "
                "the checkpoint is incomplete"
            )
        # timm's qkv rows are [q; k; v], each (heads * head_dim) in head order, exactly HF's layout.
        out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    fields = shape_fields(out)
    fields["ln_eps"] = 1e-12  # Hugging Face's default LayerNorm eps
    if hf_config:
        fields.update(_hf_config_fields(hf_config, fields))
    return out, fields


def _hf_config_fields(hf: Mapping[str, Any], derived: Mapping[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(
            f"Hugging Face config hidden_act {act!r} is not supported: our MLP uses exact (erf) 'gelu'"
        )
    for name, field in (("hidden_size", "embed_dim"), ("num_hidden_layers", "depth")):
        if name in hf and hf[name] != derived[field]:
            raise CheckpointError(
                f"Hugging Face config {name}={hf[name]} disagrees with the weights ({field}={derived[field]}): "
                "is config.json from another model?"
            )
    fields: dict[str, Any] = {"ln_eps": float(hf.get("layer_norm_eps", 1e-12))}
    if "num_attention_heads" in hf:
        fields["num_heads"] = int(hf["num_attention_heads"])
    return fields


def shape_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ViTConfig fields readable from tensor shapes of a timm-named state dict (never num_heads)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise CheckpointError(f"checkpoint has no {key!r}: cannot tell the ViT's architecture")
    c, in_chans, p, _ = sd["patch_embed.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(
            f"pos_embed has {tokens} tokens, expected 1 class token + a square patch grid "
            "(checkpoints without a class-token position or with register tokens are not supported)"
        )
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    fields: dict[str, Any] = {
        "img_size": grid * p,
        "patch_size": p,
        "in_chans": in_chans,
        "embed_dim": c,
        "depth": depth,
        "mlp_ratio": hidden / c,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }
    if int(c * fields["mlp_ratio"]) != hidden:
        raise CheckpointError(f"MLP hidden size {hidden} is not representable as embed_dim {c} x mlp_ratio")
    if "head.weight" in sd:
        fields["num_classes"] = sd["head.weight"].shape[0]
    return fields


def vit_config_for(
    state_dict: Mapping[str, torch.Tensor],
    fmt: CheckpointFormat,
    hf_config: Mapping[str, Any] | None = None,
    *,
    num_heads: int | None = None,
    num_classes: int | None = None,
) -> ViTConfig:
    """The ViTConfig a checkpoint was trained with; ``num_heads``/``num_classes`` fill what it does not record.

    timm files do not record the head count: without ``num_heads`` timm's head
    width of 64 is assumed (true of every standard timm ViT up to ViT-L).
    """
    if fmt == "polymorphd" and (cfg := _polymorphd_config(state_dict)) is not None:
        try:
            return ViTConfig(**cfg)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"polymorphd checkpoint records an invalid ViTConfig {dict(cfg)}: {exc}"
            ) from exc
    if fmt in ("hf-vit", "hf-deit"):
        _, fields = convert_hf(state_dict, hf_config)
    else:
        fields = shape_fields(unwrap_state_dict(state_dict))
    if num_heads is not None:
        fields["num_heads"] = num_heads
    elif "num_heads" not in fields:
        if fields["embed_dim"] % 64:
            raise CheckpointError(
                f"{fmt} checkpoint does not record num_heads and embed_dim {fields['embed_dim']} is not a "
                "multiple of 64: pass num_heads"
            )
        fields["num_heads"] = fields["embed_dim"] // 64
    if num_classes is not None:
        fields["num_classes"] = num_classes
    elif "num_classes" not in fields:
        raise CheckpointError(f"{fmt} checkpoint has no classifier head: pass num_classes")
    try:
        return ViTConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint architecture {fields} is not a valid ViTConfig: {exc}") from exc


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file (or a Hugging Face model / polymorphd run directory) and convert it."""
    path = _resolve(Path(path))
    raw = _load_raw(path)
    fmt = detect_format(raw)
    sibling = _sibling_config(path)
    if fmt == "polymorphd":
        return Checkpoint(path, fmt, unwrap_state_dict(raw, path), dict(_polymorphd_config(raw) or {}))
    if fmt in ("hf-vit", "hf-deit"):
        hf_config = sibling if sibling and "model_type" in sibling else None
        sd, fields = convert_hf(unwrap_state_dict(raw, path), hf_config)
        return Checkpoint(path, fmt, sd, fields)
    sd = unwrap_state_dict(raw, path)
    if sibling and isinstance(sibling.get("vit"), Mapping):  # a run directory's backbone.pt
        return Checkpoint(path, "polymorphd", sd, dict(sibling["vit"]))
    return Checkpoint(path, fmt, sd, {**shape_fields(sd), "ln_eps": 1e-6})


def checkpoint_stem(path: str | Path) -> str:
    """The stem a checkpoint was trained with: its recorded ``stem`` (polymorphd), else timm's "patch"."""
    return str(read_checkpoint(path).fields.get("stem") or "patch")


def save_checkpoint(path: str | Path, vit: VisionTransformer) -> None:
    """Write ``vit`` as a polymorphd checkpoint (weights plus the config that rebuilds it)."""
    torch.save({"format": "polymorphd", "vit": vit.cfg.to_dict(), "model": vit.state_dict()}, Path(path))


def init_from(vit: VisionTransformer, path: str | Path, *, num_classes: int) -> list[str]:
    """Load a timm/Hugging Face/polymorphd checkpoint into ``vit`` for fine-tuning; return what was adapted.

    Every tensor must match the model's shape, except the classifier head
    (re-initialised when the class count differs) and pos_embed (resampled
    bicubically when the patch grid differs). Anything else raises CheckpointError.
    """
    if num_classes != vit.cfg.num_classes:
        raise ValueError(f"num_classes {num_classes} differs from the model's {vit.cfg.num_classes}")
    ck = read_checkpoint(path)
    notes = [f"loaded {ck.format} checkpoint {ck.path}"]
    heads = ck.fields.get("num_heads")
    if heads is not None and heads != vit.cfg.num_heads:
        raise CheckpointError(
            f"checkpoint has num_heads {heads}, the model has {vit.cfg.num_heads}: the weights would load but "
            "compute different attention; choose a preset with the checkpoint's architecture"
        )
    if heads is None:
        notes.append(f"checkpoint does not record num_heads; assumed the model's {vit.cfg.num_heads}")
    eps = ck.fields.get("ln_eps")
    if eps is not None and not math.isclose(eps, vit.cfg.ln_eps):
        notes.append(f"checkpoint used LayerNorm eps {eps:g}; the model uses {vit.cfg.ln_eps:g}")
    target = vit.state_dict()
    src = ck.state_dict
    problems = []
    for key, want in target.items():
        got = src.get(key)
        if key.startswith("head.") or (key == "pos_embed" and got is not None and got.dim() == 3):
            continue
        if got is None:
            problems.append(f"{key}: found nothing, expected {tuple(want.shape)}")
        elif got.shape != want.shape:
            problems.append(f"{key}: found {tuple(got.shape)}, expected {tuple(want.shape)}")
    problems += [f"{k}: found {tuple(src[k].shape)}, expected no such tensor" for k in src if k not in target]
    if problems:
        raise CheckpointError(
            f"{ck.format} checkpoint {ck.path} does not fit the model ({len(problems)} tensors): "
            + "; ".join(problems[:5])
            + ("; ..." if len(problems) > 5 else "")
            + f". {_arch_hint(ck.fields, vit.cfg)}"
        )
    new = {k: src[k].to(want.dtype) if k in src else want for k, want in target.items()}
    new["pos_embed"] = _fit_pos_embed(src["pos_embed"], target["pos_embed"], vit.cfg, notes)
    if all(src.get(k) is not None and src[k].shape == target[k].shape for k in ("head.weight", "head.bias")):
        new["head.weight"], new["head.bias"] = src["head.weight"], src["head.bias"]
    else:
        w = torch.empty_like(target["head.weight"])
        nn.init.trunc_normal_(w, std=0.02)  # VisionTransformer's own head init
        new["head.weight"], new["head.bias"] = w, torch.zeros_like(target["head.bias"])
        found = src["head.weight"].shape[0] if "head.weight" in src else None
        what = f"{found} classes" if found is not None else "no classifier head"
        notes.append(f"head re-initialised: checkpoint has {what}, the model needs {num_classes}")
    vit.load_state_dict(new)
    for n in notes:
        log.info("init-from: %s", n)
    return notes


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, C) -> (1, 1 + grid*grid, C): class position kept, patch positions resampled bicubically."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = math.isqrt(patches.shape[1])
    c = pos.shape[-1]
    img = patches.reshape(1, g, g, c).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    # antialias matters when shrinking the grid (timm does the same).
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos.dtype)], dim=1)


def _fit_pos_embed(got: torch.Tensor, want: torch.Tensor, cfg: ViTConfig, notes: list[str]) -> torch.Tensor:
    if got.shape == want.shape:
        return got.to(want.dtype)
    g = math.isqrt(got.shape[1] - 1)
    if got.shape[0] != 1 or got.shape[2] != want.shape[2] or g * g != got.shape[1] - 1:
        raise CheckpointError(
            f"pos_embed: found {tuple(got.shape)}, expected {tuple(want.shape)} "
            "(1 class token + a square grid, same width, to be resampled)"
        )
    notes.append(f"pos_embed resampled bicubically from a {g}x{g} to a {cfg.grid}x{cfg.grid} patch grid")
    return resample_pos_embed(got, cfg.grid).to(want.dtype)


def _arch_hint(fields: Mapping[str, Any], cfg: ViTConfig) -> str:
    names = ("embed_dim", "depth", "patch_size", "mlp_ratio", "qkv_bias")
    diff = [
        f"{n}={fields[n]} (model: {getattr(cfg, n)})"
        for n in names
        if n in fields and fields[n] != getattr(cfg, n)
    ]
    if not diff:
        return "Re-export the checkpoint from a matching model."
    return f"The checkpoint's architecture differs: {', '.join(diff)}; choose a preset that matches it."


def _polymorphd_config(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    cfg = obj.get("vit") if isinstance(obj, Mapping) else None
    if isinstance(cfg, Mapping) and (obj.get("format") == "polymorphd" or "model" in obj):
        return cfg
    return None


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        return path
    for name in _DIR_FILES:
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").exists():
        raise CheckpointError(f"{path} holds a sharded checkpoint; merge the shards into one file first")
    raise CheckpointError(
        f"directory {path} has none of {list(_DIR_FILES)} (found: {sorted(p.name for p in path.iterdir())[:10]})"
    )


def _sibling_config(path: Path) -> dict[str, Any] | None:
    cfg = path.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s beside the checkpoint: %s", cfg, exc)
        return None
    return data if isinstance(data, dict) else None


def _load_raw(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(
                f"{path} is a .safetensors file and the safetensors package is not installed: "
                "pip install safetensors"
            ) from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if suffix in TORCH_SUFFIXES:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(
                f"{path} could not be read with torch.load(weights_only=True): {exc}. If it holds a whole "
                "training state with Python objects, re-save just the model's state_dict()"
            ) from exc
    raise CheckpointError(
        f"checkpoint {path} has suffix {suffix!r}: expected one of {[*TORCH_SUFFIXES, '.safetensors']}"
    )
