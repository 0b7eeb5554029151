"""A polymorph-recipe run (adapters relative to a frozen base, the generalist's LoRA merged into the backbone)
exports tail_lora/tail_weights on the base and tail on the generalist, each equal to torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymorphd.export.bundle import TAIL_BASE, export_bundle
from polymorphd.export.core.timing import session
from polymorphd.export.onnx import ATOL
from polymorphd.models.nn.lora import compose, tail_start
from polymorphd.models.train.run import load_run, save_adapter_base
from tests.conftest import make_tiny_run
from tests.export.test_onnx import read_tensors, trunk_tokens


@pytest.fixture(scope="module")
def recipe_bundle(tmp_path_factory):
    path = make_tiny_run(tmp_path_factory.mktemp("run") / "recipe", seed=3)
    run = load_run(path)
    base = run.vit
    # the saved backbone plays the generalist; the adapters' base has other tail weights (no generalist LoRA)
    t = tail_start(run.vit_config, run.lora)
    with torch.no_grad():
        for blk in base.blocks[t:]:
            for p in blk.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter_base(path, base)
    out = export_bundle(path, tmp_path_factory.mktemp("bundles") / "recipe", bench_runs=1, progress=False)
    return out, load_run(path)


def test_tail_lora_runs_the_adapters_on_the_frozen_base(recipe_bundle):
    bundle, run = recipe_bundle
    assert run.adapter_base is not None and run.lora_base is run.adapter_base
    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    tokens = trunk_tokens(bundle, images)
    files = [read_tensors(bundle / f"adapters/ctx{j}.onnx_adapter") for j in range(2)]
    feed = {k: np.concatenate([f[k] for f in files]) for k in files[0]}
    got = session(bundle / "tail_lora.onnx").run(None, {"tokens": tokens, **feed})[0]
    with torch.no_grad():
        on_base = torch.sigmoid(compose(run.adapter_base, torch.from_numpy(tokens), run.adapters[:2])).numpy()
        on_generalist = torch.sigmoid(compose(run.vit, torch.from_numpy(tokens), run.adapters[:2])).numpy()
    np.testing.assert_allclose(got, on_base, atol=ATOL, rtol=0)
    assert np.abs(got - on_generalist).max() > 10 * ATOL  # the base matters: not the generalist's tail


def test_tail_is_the_generalist_and_tail_base_holds_the_frozen_weights(recipe_bundle):
    bundle, run = recipe_bundle
    images = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    tokens = trunk_tokens(bundle, images)
    got = session(bundle / "tail.onnx").run(None, {"tokens": tokens})[0]
    t = tail_start(run.vit_config, run.lora)
    with torch.no_grad():
        want = torch.sigmoid(
            run.vit.forward_head(run.vit.forward_blocks(torch.from_numpy(tokens), t, 4))
        ).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    base = read_tensors(bundle / TAIL_BASE)
    qkv = run.adapter_base.blocks[t].attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(base[f"w.blocks.{t}.attn.qkv"], qkv)
