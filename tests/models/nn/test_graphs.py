"""The bundle's graph modules run the model's own code: one Block.forward, with or without given weights."""

from __future__ import annotations

import pytest
import torch

from polymorphd.models.core.lora_targets import TARGETS, target_dims
from polymorphd.models.nn.graphs import Probs, Segment, Tail, TailLora, TailWeights
from polymorphd.models.nn.lora import ContextAdapter, LoRAConfig, LoraName, compose, merged_copy, stack
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=6, embed_dim=48, depth=4, num_heads=3)
LORA = LoRAConfig(rank=2, alpha=4.0, last_blocks=2)
START = 2
LINEARS = [LoraName(b, t) for b in range(START, TINY.depth) for t in TARGETS]


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY, fused_attn=False).eval()


@pytest.fixture(scope="module")
def adapters(vit) -> list[ContextAdapter]:
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        a = ContextAdapter(TINY, LORA, vit.head)
        with torch.no_grad():
            for p in a.lora_B.values():
                p.normal_(std=0.1)
        out.append(a.eval())
    return out


@pytest.fixture(scope="module")
def tokens(vit) -> torch.Tensor:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return vit.forward_blocks(vit.forward_embed(images), 0, START)


def weights_of(vit: VisionTransformer) -> list[torch.Tensor]:
    flat = []
    for n in LINEARS:
        layer = vit.blocks[n.block].get_submodule(n.target)
        flat += [layer.weight, layer.bias]
    return [*flat, vit.head.weight, vit.head.bias]


def test_the_table_gives_every_block_linear_its_shape(vit):
    c, h = TINY.embed_dim, int(TINY.embed_dim * TINY.mlp_ratio)
    for t in TARGETS:
        fin, fout = target_dims(t, c, h)
        assert vit.blocks[0].get_submodule(t).weight.shape == (fout, fin)


@torch.no_grad()
def test_given_weights_equal_the_blocks_own_exactly(vit, tokens):
    blk = vit.blocks[START]
    weights = {t: (blk.get_submodule(t).weight.clone(), blk.get_submodule(t).bias.clone()) for t in TARGETS}
    torch.testing.assert_close(blk(tokens, weights=weights), blk(tokens), rtol=0, atol=0)
    got = TailWeights(vit, START, LINEARS)(tokens, *weights_of(vit))
    torch.testing.assert_close(got, Tail(vit, START)(tokens), rtol=0, atol=0)


@torch.no_grad()
def test_tail_weights_fed_merged_weights_equal_the_merged_model(vit, adapters, tokens):
    merged = merged_copy(vit, adapters[0])
    got = TailWeights(vit, START, LINEARS)(tokens, *weights_of(merged))
    torch.testing.assert_close(got, Tail(merged, START)(tokens), rtol=0, atol=1e-6)


@torch.no_grad()
def test_tail_lora_equals_compose(vit, adapters, tokens):
    names = adapters[0].param_names()
    deltas, w, b = stack(adapters)
    flat = [t for n in names for t in deltas[n.block][n.target]]
    got = TailLora(vit, START, names)(tokens[:1], *flat, w, b)
    torch.testing.assert_close(got, torch.sigmoid(compose(vit, tokens[:1], adapters)), rtol=0, atol=0)


@torch.no_grad()
def test_segments_and_tail_equal_the_whole_model(vit, tokens):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    x = Segment(vit, 1, START)(Segment(vit, 0, 1)(images))
    torch.testing.assert_close(Tail(vit, START)(x), torch.sigmoid(vit(images)), rtol=0, atol=1e-6)
    assert torch.equal(Probs(torch.nn.Identity())(tokens), torch.sigmoid(tokens))
