"""Exit branches: shapes for both kinds, narrowness, and invalid configs that name the value."""

from __future__ import annotations

import re

import pytest
import torch

from polymorphd.models.nn.exits import ExitConfig, MLPExit, SLViTExit, build_exit
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=4, num_heads=3)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    torch.manual_seed(0)
    vit = VisionTransformer(TINY).eval()
    with torch.no_grad():
        return vit.forward_blocks(vit.forward_embed(torch.randn(3, 3, 32, 32)), 0, 2)


@pytest.mark.parametrize(
    "cfg,cls",
    [
        (ExitConfig(after_block=2, width=24, num_heads=2, pool_grid=2), SLViTExit),
        (ExitConfig(after_block=1, width=24, num_heads=3, pool_grid=1), SLViTExit),
        (ExitConfig(after_block=2, width=24, num_heads=2, pool_grid=4), SLViTExit),
        (ExitConfig(after_block=2, kind="mlp", mlp_hidden=32), MLPExit),
    ],
)
@torch.no_grad()
def test_output_shapes_for_both_kinds(tokens, cfg, cls):
    ex = build_exit(TINY, cfg).eval()
    assert isinstance(ex, cls)
    out = ex(tokens)
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    # rows are independent: one frame alone gives the same logits
    torch.testing.assert_close(ex(tokens[1:2])[0], out[1], rtol=0, atol=1e-5)


@torch.no_grad()
def test_slvit_exit_fused_and_math_attention_agree(tokens):
    cfg = ExitConfig(after_block=2, width=24, num_heads=2)
    torch.manual_seed(1)
    fused = build_exit(TINY, cfg, fused_attn=True).eval()
    math_ = build_exit(TINY, cfg, fused_attn=False).eval()
    math_.load_state_dict(fused.state_dict())
    torch.testing.assert_close(math_(tokens), fused(tokens), rtol=1e-5, atol=1e-5)


def test_slvit_exit_reads_pooled_tokens_and_the_class_token(tokens):
    ex = build_exit(TINY, ExitConfig(after_block=2, width=24, num_heads=2, pool_grid=2)).eval()
    with torch.no_grad():
        base = ex(tokens)
        cls_changed = tokens.clone()
        cls_changed[:, 0] += 1.0
        patch_changed = tokens.clone()
        patch_changed[:, 5] += 1.0
        assert (ex(cls_changed) - base).abs().max() > 1e-4
        assert (ex(patch_changed) - base).abs().max() > 1e-4


def test_mlp_exit_reads_only_the_class_token(tokens):
    ex = build_exit(TINY, ExitConfig(after_block=2, kind="mlp", mlp_hidden=32)).eval()
    with torch.no_grad():
        changed = tokens.clone()
        changed[:, 1:] = 0
        assert torch.equal(ex(changed), ex(tokens))


def test_config_round_trips_through_a_dict():
    cfg = ExitConfig(after_block=3, kind="mlp", mlp_hidden=64)
    assert ExitConfig(**cfg.to_dict()) == cfg
    assert ExitConfig(after_block=1, pool_grid=3).num_tokens == 10


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"after_block": 1, "kind": "cnn"}, "exit kind 'cnn' invalid"),
        ({"after_block": 0}, "after_block must be >= 1, got 0"),
        ({"after_block": 1, "width": 25, "num_heads": 2}, "exit width 25 is not divisible by num_heads 2"),
        ({"after_block": 1, "num_heads": 0}, "exit num_heads must be >= 1, got 0"),
        ({"after_block": 1, "pool_grid": 0}, "exit pool_grid must be >= 1, got 0"),
        ({"after_block": 1, "mlp_hidden": 0}, "exit mlp_hidden must be >= 1, got 0"),
        ({"after_block": 1, "mlp_ratio": -1.0}, "exit mlp_ratio must be > 0, got -1.0"),
    ],
)
def test_invalid_exit_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ExitConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"after_block": 4}, "exit after_block 4 must be below the backbone depth 4"),
        ({"after_block": 1, "pool_grid": 8}, "exit pool_grid 8 exceeds the token grid 4"),
        ({"after_block": 1, "pool_grid": 3}, "exit pool_grid 3 must divide the token grid 4"),
    ],
)
def test_exit_that_does_not_fit_the_backbone_names_the_value(kwargs, message):
    cfg = ExitConfig(width=24, num_heads=2, **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_exit(TINY, cfg)
    with pytest.raises(ValueError, match=re.escape(message)):
        SLViTExit(TINY, cfg)  # built directly, too
