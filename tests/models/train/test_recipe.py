"""The polymorph recipe: the base stays frozen, all-class models get the adapters' total budget, adapters see their
context's frames and negatives from the others."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from polymorphd.models.core.preprocess import InputSpec
from polymorphd.models.nn import lora
from polymorphd.models.nn.lora import merged_copy
from polymorphd.models.nn.vit import VisionTransformer
from polymorphd.models.train import recipe
from polymorphd.models.train.distributed import DistEnv
from polymorphd.models.train.loop import Ctx, SplitData
from polymorphd.models.train.presets import get_preset


def _split(name: str, n: int, seed: int) -> SplitData:
    rng = np.random.default_rng(seed)
    Y = np.zeros((n, 6), np.uint8)
    Y[np.arange(n), rng.integers(0, 6, n)] = 1
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    return SplitData(name, images, Y, np.repeat(np.arange(n // 8), 8))


@pytest.fixture
def ctx(monkeypatch) -> Ctx:
    monkeypatch.setattr(recipe, "EPOCH_SAMPLES", 64)
    preset = recipe.recipe_preset(get_preset("tiny"))
    preset = replace(preset, adapters=replace(preset.adapters, epochs=2, batch_size=32))
    return Ctx(spec=InputSpec(size=32), preset=preset, env=DistEnv(), seed=0, progress=False)


def test_backbone_is_unchanged_by_generalist_and_adapter_training(ctx):
    torch.manual_seed(0)
    base = VisionTransformer(ctx.preset.vit_config(6))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    train, calib, report = _split("train", 96, 0), _split("validation", 32, 1), _split("test", 32, 2)
    gen_adapter, gen = recipe.train_generalist(base, train, calib, report, ctx)
    generalist = merged_copy(base, gen_adapter)
    adapters, res = recipe.train_adapters(base, generalist, [[0, 1, 2], [3, 4, 5]], train, calib, report, ctx)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the LoRAs did train (B starts at zero), so a frozen base is not a no-op
    assert any(p.abs().max() > 0 for p in gen_adapter.lora_B.values())
    assert all(any(p.abs().max() > 0 for p in a.lora_B.values()) for a in adapters)
    # the recipe's LoRA sits on the last block only
    assert [n.block for n in adapters[0].param_names()] == [base.cfg.depth - 1] * 4
    assert res["recipe"]["budget_per_adapter"] == {
        "epochs": 2,
        "samples_per_epoch": 64,
        "batch_size": 32,
        "lr": ctx.preset.adapters.lr,
        "steps": 4,
    }
    rows = res["adapters"]
    assert [r["classes"] for r in rows] == [[0, 1, 2], [3, 4, 5]]
    for r in rows:
        for key in ("map_generalist", "map_adapter", "map_full_tail"):
            assert 0.0 <= r[key] <= 1.0
    assert set(res["recipe"]) == {
        "generalist", "adapters_everywhere", "full_tail", "budget_per_adapter", "warm_start"
    }  # fmt: skip
    assert res["recipe"]["warm_start"] is recipe.WARM_START
    # the all-class models get the adapters' total: the generalist as many budgets as it was told (the run
    # passes its context count), the full-tail model one per context
    assert gen["budget"]["steps"] == 4 and res["recipe"]["full_tail"]["budget"]["steps"] == 2 * 4


def test_adapter_training_refuses_a_base_that_changes(ctx, monkeypatch):
    base = VisionTransformer(ctx.preset.vit_config(6))
    train = _split("train", 64, 0)
    real = recipe.train_model

    def sabotage(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        with torch.no_grad():
            base.blocks[0].attn.qkv.weight.add_(1.0)
        return out

    monkeypatch.setattr(recipe, "train_model", sabotage)
    with pytest.raises(RuntimeError, match=r"backbone tensor .* changed"):
        recipe.train_adapters(base, base, [[0, 1]], train, _split("v", 32, 1), _split("t", 32, 2), ctx)


def test_epoch_pools_have_equal_size_and_the_contexts_share_of_negatives(monkeypatch):
    monkeypatch.setattr(recipe, "EPOCH_SAMPLES", 300)
    Y = np.zeros((1000, 4), np.uint8)
    Y[:50, 0] = 1  # a rare context: 50 frames, drawn with replacement
    Y[50:, 2] = 1
    everything = recipe.epoch_pool(Y, None, 1.0, [0])(0)
    assert len(everything) == 300 and len(set(everything.tolist())) == 300  # no repeats when frames suffice
    ctx0 = recipe.epoch_pool(Y, [0, 1], 1.0, [0])
    idx = ctx0(0).numpy()
    assert len(idx) == 300
    pos = Y[idx][:, [0, 1]].any(axis=1)
    assert pos.sum() == 150 and set(idx[pos]) <= set(range(50))
    assert not np.array_equal(ctx0(1).numpy(), idx)  # fresh draws every epoch
    # a context without training frames trains on nothing rather than on negatives only
    assert len(recipe.epoch_pool(Y, [3], 1.0, [0])(0)) == 0


def test_class_token_tail_equals_the_plain_tail_with_and_without_lora() -> None:
    from polymorphd.models.nn.lora import AdapterTail, ContextAdapter

    torch.manual_seed(1)
    preset = get_preset("tiny")
    vit = VisionTransformer(preset.vit_config(6)).eval()
    tokens = torch.randn(5, vit.cfg.num_tokens, vit.cfg.embed_dim)
    for blocks in (1, 2):
        a = ContextAdapter(vit.cfg, replace(preset.lora_config(), last_blocks=blocks), head_init=vit.head)
        with torch.no_grad():
            for p in a.lora_B.values():
                p.normal_(std=0.1)
        want = vit.forward_head(vit.forward_blocks(tokens, a.start, vit.cfg.depth, a.deltas()), a.head)
        got = AdapterTail(vit, a)(tokens)  # the class-token-only last block
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    full = recipe.FullTail(vit, vit.cfg.depth - 2)
    torch.testing.assert_close(
        full(tokens), vit.forward_head(vit.forward_blocks(tokens, 2, 4)), atol=1e-5, rtol=1e-5
    )


def test_warm_adapters_start_as_the_generalist_which_trains_on_for_their_budget(ctx):
    """The generalist's LoRA comes back from the merged weights (SVD of the rank-r difference): a warm adapter
    at epoch 0 scores exactly as the generalist. The generalist then gets the adapters' total budget more,
    and each model keeps its epoch 0 unless an epoch beats it on the calibration split."""
    torch.manual_seed(0)
    base = VisionTransformer(ctx.preset.vit_config(6))
    train, calib, report = _split("train", 96, 0), _split("validation", 32, 1), _split("test", 32, 2)
    gen_adapter, _ = recipe.train_generalist(base, train, calib, report, ctx)
    generalist = merged_copy(base, gen_adapter)
    lora_cfg = ctx.preset.lora_config()
    warm = recipe.generalist_lora(base, generalist, lora_cfg)
    tokens = torch.randn(5, base.cfg.num_tokens, base.cfg.embed_dim)
    start = warm.start
    direct = lora.tail_cls_logits(generalist.blocks[start:], generalist.norm, generalist.head, tokens)
    torch.testing.assert_close(lora.AdapterTail(base, warm)(tokens), direct, atol=1e-4, rtol=1e-4)
    contexts = [[0, 1, 2], [3, 4, 5]]
    adapters, res = recipe.train_adapters(
        base, generalist, contexts, train, calib, report, ctx, full_tail=False, warm_start=True
    )
    summary, rows = res["recipe"], res["adapters"]
    assert summary["warm_start"] is True and "full_tail" not in summary
    assert summary["generalist_continued"]["budget"]["steps"] == 2 * 4  # one adapter budget per context
    for r, a in zip(rows, adapters, strict=True):
        assert 0.0 <= r["map_generalist_continued"] <= 1.0 and r["best_epoch"] >= 0
        if r["best_epoch"] == 0:  # kept the start: the generalist itself on its classes
            assert r["map_adapter"] == pytest.approx(r["map_generalist"], abs=1e-6)
            torch.testing.assert_close(a.head.weight, generalist.head.weight)
