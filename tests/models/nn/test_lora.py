"""Context adapters: batched composition equals each adapter alone and its merged model; the base stays frozen."""

from __future__ import annotations

import copy

import pytest
import torch

from polymorphd.models.nn.lora import (
    ContextAdapter,
    LoRAConfig,
    LoraName,
    adapter_logits,
    compose,
    merge_,
    merged_copy,
    stack,
    tail_start,
    unmerge_,
)
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=6, embed_dim=48, depth=4, num_heads=3)
LORA = LoRAConfig(rank=2, alpha=4.0, last_blocks=2)


def _trained_like(vit: VisionTransformer, seed: int, cfg: LoRAConfig = LORA) -> ContextAdapter:
    """An adapter whose B is non-zero (as after training), so it changes the output."""
    torch.manual_seed(seed)
    a = ContextAdapter(TINY, cfg, vit.head)
    with torch.no_grad():
        for p in a.lora_B.values():
            p.normal_(std=0.1)
        a.head.weight.add_(torch.randn_like(a.head.weight) * 0.1)
    return a.eval()


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY, fused_attn=False).eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_batched_composition_equals_each_adapter_alone_and_merged(vit, frames, fused):
    vit.set_fused_attn(fused)
    adapters = [_trained_like(vit, s) for s in (1, 2, 3)]
    start = tail_start(TINY, LORA)
    for frame in frames:
        tokens = vit.forward_blocks(vit.forward_embed(frame[None]), 0, start)  # (1, N, C) shared trunk
        batched = compose(vit, tokens, adapters)
        assert batched.shape == (3, 6)
        for m, a in enumerate(adapters):
            alone = adapter_logits(vit, tokens, a)[0]
            merged = merged_copy(vit, a)(frame[None])[0]
            torch.testing.assert_close(batched[m], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(batched[m], merged, rtol=0, atol=1e-5)
        # adapters really differ from each other and from the generalist
        assert (batched[0] - batched[1]).abs().max() > 1e-3
        assert (batched[0] - vit(frame[None])[0]).abs().max() > 1e-3
    vit.set_fused_attn(False)


@torch.no_grad()
def test_composition_of_a_subset_and_of_per_frame_tokens(vit, frames):
    adapters = [_trained_like(vit, s) for s in (4, 5)]
    start = tail_start(TINY, LORA)
    tokens = vit.forward_blocks(vit.forward_embed(frames), 0, start)  # (2, N, C): row m -> adapter m
    both = compose(vit, tokens, adapters)
    torch.testing.assert_close(both[1], compose(vit, tokens[1:], adapters[1:])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[0], adapter_logits(vit, tokens[:1], adapters[0])[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_fresh_adapter_is_the_identity(vit, frames):
    fresh = ContextAdapter(TINY, LORA, vit.head).eval()
    assert all(torch.count_nonzero(b) == 0 for b in fresh.lora_B.values())
    start = tail_start(TINY, LORA)
    tokens = vit.forward_blocks(vit.forward_embed(frames), 0, start)
    torch.testing.assert_close(adapter_logits(vit, tokens, fresh), vit(frames), rtol=0, atol=1e-6)
    torch.testing.assert_close(compose(vit, tokens[:1], [fresh])[0], vit(frames[:1])[0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_merge_then_unmerge_restores_the_weights(vit, frames):
    model = copy.deepcopy(vit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = _trained_like(vit, 7)
    generalist_head = copy.deepcopy(model.head)
    merge_(model, a)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.3.attn.qkv.weight" in changed and "head.weight" in changed
    assert not any(k.startswith(("blocks.0.", "blocks.1.")) for k in changed)  # the trunk is never touched
    unmerge_(model, a, generalist_head)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(model(frames), vit(frames), rtol=0, atol=1e-5)


def test_adapter_step_leaves_the_base_bit_identical_and_only_adapters_get_grads(vit, frames):
    vit = copy.deepcopy(vit)
    base = {k: v.clone() for k, v in vit.state_dict().items()}
    for p in vit.parameters():
        p.requires_grad_(False)
    a = ContextAdapter(TINY, LORA, vit.head).train()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    start = tail_start(TINY, LORA)
    with torch.no_grad():
        tokens = vit.forward_blocks(vit.forward_embed(frames), 0, start)
    for _ in range(2):  # after step 1 B is non-zero, so step 2 also moves A
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            adapter_logits(vit, tokens, a), torch.ones(2, 6)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in vit.parameters())
    assert all(p.grad is not None for p in a.parameters())
    for k, v in vit.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert any(torch.count_nonzero(b) > 0 for b in a.lora_B.values())


def test_stack_shapes_and_names():
    vit = VisionTransformer(TINY)
    adapters = [ContextAdapter(TINY, LORA, vit.head) for _ in range(3)]
    deltas, w, b = stack(adapters)
    assert sorted(deltas) == [2, 3]
    a, bb = deltas[2]["mlp.fc1"]
    assert a.shape == (3, 2, 48) and bb.shape == (3, 192, 2)
    assert deltas[3]["attn.qkv"][1].shape == (3, 144, 2)
    assert w.shape == (3, 6, 48) and b.shape == (3, 6)
    n = LoraName(3, "attn.qkv")
    assert (n.key, n.onnx) == ("b3_attn_qkv", "blocks.3.attn.qkv")
    assert [x.key for x in adapters[0].param_names()][:2] == ["b2_attn_qkv", "b2_attn_proj"]
    with pytest.raises(ValueError, match="at least one adapter"):
        stack([])


def test_targets_subset_only_adapts_those_layers(vit, frames):
    cfg = LoRAConfig(rank=2, alpha=4.0, last_blocks=1, targets=("mlp.fc2",))
    a = _trained_like(vit, 9, cfg)
    assert [n.onnx for n in a.param_names()] == ["blocks.3.mlp.fc2"]
    merged = merged_copy(vit, a)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, vit.state_dict()[k])]
    assert sorted(changed) == ["blocks.3.mlp.fc2.weight", "head.weight"]  # head bias was left as initialised


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"last_blocks": 0}, "last_blocks must be >= 1, got 0"),
        ({"targets": ("attn.qkv", "attn.kv")}, "attn.kv"),
        ({"targets": ()}, r"LoRA targets \[\] invalid"),
        ({"targets": ("mlp.fc1", "mlp.fc1")}, "distinct"),
    ],
)
def test_invalid_lora_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_tail_longer_than_the_backbone_raises():
    with pytest.raises(ValueError, match="last_blocks 5 exceeds the backbone depth 4"):
        ContextAdapter(TINY, LoRAConfig(last_blocks=5))
