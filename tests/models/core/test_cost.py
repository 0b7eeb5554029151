"""Analytical FLOPs against torch's FLOP counter; exits are cheaper than a block; torch-free import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polymorphd.models.core import cost
from polymorphd.models.nn.exits import ExitConfig, build_exit
from polymorphd.models.nn.lora import ContextAdapter, LoRAConfig, compose
from polymorphd.models.nn.vit import Block, VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=4, num_heads=3)
LORA = LoRAConfig(rank=2, alpha=4.0, last_blocks=2)


def counted(fn, *args) -> int:
    """FLOPs torch counts for one call. Explicit (unfused) attention: the CPU SDPA kernel is not counted."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops()


@pytest.mark.parametrize(
    "cfg",
    [TINY, ViTConfig(img_size=64, patch_size=8, embed_dim=96, num_heads=2, mlp_ratio=3.0, depth=2)],
)
def test_block_formula_matches_the_flop_counter(cfg):
    blk = Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, fused=False).eval()
    x = torch.randn(1, cfg.num_tokens, cfg.embed_dim)
    got = counted(blk, x)
    assert cost.block_flops(cfg) == pytest.approx(got, rel=0.03)
    assert cost.block_flops(cfg, n_tokens=5) == pytest.approx(counted(blk, x[:, :5]), rel=0.03)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_full_model_and_embedding_match_the_flop_counter(stem):
    cfg = dataclasses.replace(TINY, stem=stem)
    vit = VisionTransformer(cfg, fused_attn=False).eval()
    images = torch.randn(1, 3, 32, 32)
    assert cost.full_flops(cfg) == pytest.approx(counted(vit, images), rel=0.03)
    assert cost.embed_flops(cfg) == counted(vit.patch_embed, images)  # convolutions: exact
    assert cost.head_flops(cfg) == counted(vit.head, torch.randn(1, 48))


@pytest.mark.parametrize(
    "ecfg",
    [ExitConfig(after_block=2, width=24, num_heads=2), ExitConfig(after_block=1, kind="mlp", mlp_hidden=64)],
)
def test_exit_formula_matches_the_flop_counter_and_costs_less_than_a_block(ecfg):
    ex = build_exit(TINY, ecfg, fused_attn=False).eval()
    tokens = torch.randn(1, TINY.num_tokens, 48)
    assert cost.exit_flops(TINY, ecfg) == pytest.approx(counted(ex, tokens), rel=0.03)
    assert cost.exit_flops(TINY, ecfg) < cost.block_flops(TINY)


def test_default_exits_cost_less_than_a_block_at_the_default_size():
    cfg = ViTConfig()
    for ecfg in (ExitConfig(after_block=2), ExitConfig(after_block=2, kind="mlp")):
        assert cost.exit_flops(cfg, ecfg) < 0.5 * cost.block_flops(cfg)


@pytest.mark.parametrize("m", [1, 3])
def test_lora_tail_matches_the_flop_counter(m):
    vit = VisionTransformer(TINY, fused_attn=False).eval()
    adapters = [ContextAdapter(TINY, LORA, vit.head) for _ in range(m)]
    tokens = torch.randn(1, TINY.num_tokens, 48)
    assert cost.tail_flops(TINY, LORA, m) == pytest.approx(counted(compose, vit, tokens, adapters), rel=0.03)
    assert cost.tail_flops(TINY, LORA, m) == m * cost.tail_flops(TINY, LORA, 1)
    deltas = cost.lora_flops(TINY, LORA)
    assert 0 < deltas < 0.1 * 2 * cost.block_flops(TINY)  # rank 2: the deltas are cheap next to the blocks


def test_tail_with_no_adapters_is_free_and_negative_counts_raise():
    assert cost.tail_flops(TINY, LORA, 0) == 0
    with pytest.raises(ValueError, match="num_adapters must be >= 0, got -1"):
        cost.tail_flops(TINY, LORA, -1)
    with pytest.raises(ValueError, match="last_blocks 5 exceeds the backbone depth 4"):
        cost.tail_flops(TINY, LoRAConfig(last_blocks=5), 1)
    with pytest.raises(ValueError, match=r"block range 3\.\.5 is outside 0\.\.4"):
        cost.blocks_flops(TINY, 3, 5)


def test_bundle_gflops_adds_up_and_frame_gflops_counts_what_ran():
    exits = [
        ExitConfig(after_block=1, width=24, num_heads=2),
        ExitConfig(after_block=2, width=24, num_heads=2),
    ]
    g = cost.bundle_gflops(TINY, [[0, 1], [1, 2]], exits, LORA)
    assert len(g["segments"]) == 2 and len(g["exits"]) == 2
    trunk = sum(g["segments"])
    assert trunk + g["tail"] == pytest.approx(g["full"])
    assert g["segments"][0] == pytest.approx(cost.gflops(cost.embed_flops(TINY) + cost.block_flops(TINY)))
    assert g["tail_lora_per_adapter"] > g["tail"]
    assert cost.frame_gflops(g, segments=1, exits=1) == pytest.approx(g["segments"][0] + g["exits"][0])
    assert cost.frame_gflops(g, segments=2, exits=2, adapters=2) == pytest.approx(
        trunk + sum(g["exits"]) + 2 * g["tail_lora_per_adapter"]
    )
    with pytest.raises(ValueError, match="ran 3 segments and 0 exits, the bundle has 2 and 2"):
        cost.frame_gflops(g, segments=3, exits=0)


def test_count_params():
    vit = VisionTransformer(TINY)
    assert cost.count_params(vit) == sum(p.numel() for p in vit.parameters())
    a = ContextAdapter(TINY, LORA, vit.head)
    per_block = 2 * (48 + 144) + 2 * (48 + 48) + 2 * (48 + 192) + 2 * (192 + 48)  # r x (in + out) per target
    assert cost.count_params(a) == 2 * per_block + 48 * 5 + 5
    a.head.requires_grad_(False)
    assert cost.count_params(a, trainable_only=True) == 2 * per_block


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None\nimport polymorphd.models.core.cost as c\nprint(c.gflops(2e9))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2.0"
