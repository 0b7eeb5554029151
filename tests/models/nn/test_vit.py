"""The ViT's seams: the split forward equals the whole forward; fused and explicit attention agree."""

from __future__ import annotations

import re

import pytest
import torch

from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=4, num_heads=3)


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_forward_equals_its_parts_split_at_every_seam(vit, images):
    whole = vit(images)
    assert whole.shape == (3, 5)
    tokens = vit.forward_embed(images)
    assert tokens.shape == (3, TINY.num_tokens, 48)
    for seam in range(TINY.depth + 1):
        x = vit.forward_blocks(tokens, 0, seam)
        x = vit.forward_blocks(x, seam, TINY.depth)
        torch.testing.assert_close(vit.forward_head(x), whole, rtol=0, atol=1e-6)
    # three segments, the way an export cuts the trunk
    x = vit.forward_blocks(vit.forward_blocks(vit.forward_blocks(tokens, 0, 1), 1, 3), 3, 4)
    torch.testing.assert_close(vit.forward_head(x), whole, rtol=0, atol=1e-6)


@torch.no_grad()
def test_empty_block_range_is_identity(vit, images):
    tokens = vit.forward_embed(images)
    assert torch.equal(vit.forward_blocks(tokens, 2, 2), tokens)


@torch.no_grad()
def test_fused_and_math_attention_agree(images):
    torch.manual_seed(0)
    fused = VisionTransformer(TINY, fused_attn=True).eval()
    math_ = VisionTransformer(TINY, fused_attn=False).eval()
    math_.load_state_dict(fused.state_dict())
    torch.testing.assert_close(math_(images), fused(images), rtol=1e-5, atol=1e-5)
    fused.set_fused_attn(False)
    torch.testing.assert_close(fused(images), math_(images), rtol=0, atol=0)


@torch.no_grad()
def test_forward_head_accepts_another_head(vit, images):
    head = torch.nn.Linear(48, 7)
    x = vit.forward_blocks(vit.forward_embed(images), 0, TINY.depth)
    assert vit.forward_head(x, head).shape == (3, 7)


def test_timm_parameter_names(vit):
    names = set(vit.state_dict())
    for n in (
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.3.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.2.norm2.bias",
        "norm.weight",
        "head.weight",
    ):
        assert n in names


@pytest.mark.parametrize("start,end", [(-1, 2), (3, 2), (0, 5)])
def test_block_range_outside_depth_raises(vit, images, start, end):
    with pytest.raises(ValueError, match=re.escape(f"{start}..{end}")):
        vit.forward_blocks(vit.forward_embed(images), start, end)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"img_size": 30}, "img_size 30 is not a multiple of patch_size 8"),
        ({"embed_dim": 50}, "embed_dim 50 is not divisible by num_heads 3"),
        ({"num_heads": 0}, "num_heads must be >= 1, got 0"),
        ({"depth": 0}, "depth must be >= 1, got 0"),
        ({"patch_size": 0}, "patch_size must be >= 1, got 0"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0, got 0.0"),
    ],
)
def test_invalid_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ViTConfig(**{**TINY.to_dict(), **kwargs})


def test_config_geometry():
    assert (TINY.grid, TINY.num_tokens) == (4, 17)
    assert ViTConfig(**TINY.to_dict()) == TINY


def test_conv_stem_keeps_the_token_layout_and_seams():
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=2, num_heads=3, stem="conv")
    vit = VisionTransformer(cfg, fused_attn=False).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = vit.forward_embed(x)
    assert tokens.shape == (2, cfg.num_tokens, 48)
    assert torch.allclose(vit(x), vit.forward_head(vit.forward_blocks(tokens, 0, 2)), atol=1e-6)
    assert [m.out_channels for m in vit.patch_embed.stem if isinstance(m, torch.nn.Conv2d)] == [32, 48, 48]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stem": "resnet"}, "stem 'resnet' invalid"),
        ({"stem": "conv", "patch_size": 6, "img_size": 36}, "power-of-two patch_size, got 6"),
    ],
)
def test_stem_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**kwargs)
