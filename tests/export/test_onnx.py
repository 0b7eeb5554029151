"""Every exported graph equals torch; tail_lora equals lora.compose; tail_weights equals merged_copy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from polymorphd.export.core.timing import session
from polymorphd.export.onnx import ATOL, check_graph, export_graph
from polymorphd.export.plan import adapter_tensors, plan_graphs, segment_bounds
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.nn.lora import compose, merged_copy, tail_start
from polymorphd.models.train.run import load_run

GRAPHS = ["segment_0", "segment_1", "exit_0", "exit_1", "tail", "tail_lora", "tail_weights"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def specs(run):
    return {s.name: s for s in plan_graphs(run)}


def read_tensors(path) -> dict[str, np.ndarray]:
    return {
        k: v.numpy().copy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()
    }


def test_plan_has_every_bundle_graph(specs):
    assert list(specs) == GRAPHS


@pytest.mark.parametrize("name", GRAPHS)
def test_ort_equals_torch_on_random_inputs(bundle, specs, name):
    # batch 3 is not the export example's 2: the dynamic B / M dims are exercised
    assert check_graph(specs[name], bundle / f"{name}.onnx", seed=7, batch=3) <= ATOL


def test_check_graph_raises_naming_the_file(bundle, specs):
    with pytest.raises(BundleError, match=r"exit_1\.onnx: ONNX Runtime differs from torch by"):
        check_graph(specs["exit_0"], bundle / "exit_1.onnx")


def trunk_tokens(bundle, images: np.ndarray) -> np.ndarray:
    x = images
    for f in ("segment_0.onnx", "segment_1.onnx"):
        x = session(bundle / f).run(None, {"image" if f == "segment_0.onnx" else "tokens": x})[0]
    return x


@pytest.mark.parametrize("m", [1, 2, 3])
def test_tail_lora_with_m_adapters_equals_compose(bundle, run, m):
    images = np.random.default_rng(m).standard_normal((1, 3, 32, 32)).astype(np.float32)
    tokens = trunk_tokens(bundle, images)
    files = [read_tensors(bundle / f"adapters/ctx{j}.onnx_adapter") for j in range(m)]
    feed = {k: np.concatenate([f[k] for f in files]) for k in files[0]}
    got = session(bundle / "tail_lora.onnx").run(None, {"tokens": tokens, **feed})[0]
    with torch.no_grad():
        want = torch.sigmoid(compose(run.vit, torch.from_numpy(tokens), run.adapters[:m])).numpy()
    assert got.shape == (m, 10)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("j", [0, 2])
def test_tail_weights_with_merged_weights_equals_merged_copy(bundle, run, j):
    merged = merged_copy(run.vit, run.adapters[j])
    t = tail_start(run.vit_config, run.lora)
    tokens = np.random.default_rng(j).standard_normal((2, 17, 48)).astype(np.float32)
    feed = {
        "tokens": tokens,
        "head_w": merged.head.weight.detach().numpy(),
        "head_b": merged.head.bias.detach().numpy(),
    }
    for blk in range(t, 4):
        for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            layer = merged.blocks[blk].get_submodule(target)
            feed[f"w.blocks.{blk}.{target}"] = layer.weight.detach().numpy()
            feed[f"b.blocks.{blk}.{target}"] = layer.bias.detach().numpy()
    got = session(bundle / "tail_weights.onnx").run(None, feed)[0]
    with torch.no_grad():
        want = torch.sigmoid(
            merged.forward_head(merged.forward_blocks(torch.from_numpy(tokens), t, 4))
        ).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    # the engine's merged baseline: tail_base + B @ A from the adapter file gives the same feed
    base, ad = (
        read_tensors(bundle / "tail_base.onnx_adapter"),
        read_tensors(bundle / f"adapters/ctx{j}.onnx_adapter"),
    )
    for key in base:
        name = key[2:]
        if key.startswith("w.") and f"lora_A.{name}" in ad:
            base[key] = base[key] + ad[f"lora_B.{name}"][0] @ ad[f"lora_A.{name}"][0]
    base["head_w"], base["head_b"] = ad["head_w"][0], ad["head_b"][0]
    got2 = session(bundle / "tail_weights.onnx").run(None, {"tokens": tokens, **base})[0]
    np.testing.assert_allclose(got2, want, atol=ATOL, rtol=0)


def test_adapter_files_hold_folded_tensors(bundle, run):
    got = read_tensors(bundle / "adapters/ctx1.onnx_adapter")
    want = adapter_tensors(run.adapters[1])
    assert sorted(got) == sorted(want)
    assert got["lora_A.blocks.2.attn.qkv"].shape == (1, 2, 48)
    assert got["lora_B.blocks.3.mlp.fc2"].shape == (1, 48, 2)
    assert got["head_w"].shape == (1, 10, 48) and got["head_b"].shape == (1, 10)
    b = run.adapters[1].lora_B["b2_attn_qkv"].detach().numpy() * run.lora.scale
    np.testing.assert_allclose(got["lora_B.blocks.2.attn.qkv"][0], b, rtol=1e-6)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_segments_cut_at_exits_and_tail_start(run):
    assert segment_bounds(run) == [(0, 1), (1, 2)]


def test_exit_past_tail_start_is_rejected(run):
    from dataclasses import replace

    bad = replace(run, exit_configs=[replace(run.exit_configs[0], after_block=3)])
    with pytest.raises(ConfigError, match=r"exit after block 3 sits past the LoRA tail start 2"):
        segment_bounds(bad)


@pytest.mark.slow
def test_dynamo_exporter_also_matches_torch(tmp_path, specs):
    pytest.importorskip("onnxscript")
    diff = export_graph(specs["exit_0"], tmp_path / "exit_0.onnx", exporter="dynamo")
    assert diff <= ATOL
    sess = session(tmp_path / "exit_0.onnx")
    assert [i.name for i in sess.get_inputs()] == ["tokens"]
    assert sess.get_inputs()[0].shape[0] == "B"


def test_unknown_exporter_is_rejected(tmp_path, specs):
    with pytest.raises(ConfigError, match="exporter 'jit' invalid"):
        export_graph(specs["exit_0"], tmp_path / "x.onnx", exporter="jit")
