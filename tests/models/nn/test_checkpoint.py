"""Checkpoint loading: parity with Hugging Face transformers' ViT, timm/polymorphd round trips, clear failures."""

from __future__ import annotations

import sys

import pytest
import torch

from polymorphd.models.core.errors import CheckpointError
from polymorphd.models.nn.checkpoint import (
    convert_hf,
    detect_format,
    init_from,
    load_state_dict_file,
    read_checkpoint,
    resample_pos_embed,
    save_checkpoint,
    vit_config_for,
)
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

transformers = pytest.importorskip("transformers")

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=2, num_heads=3)
HF_ARGS = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=192,
    image_size=32,
    patch_size=8,
)


def _hf_vit_config(**kw):
    return transformers.ViTConfig(**{**HF_ARGS, **kw})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(_hf_vit_config(num_labels=5)).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_classifier):
    """What the Hub serves: config.json + model.safetensors with the Hub's tensor names."""
    path = tmp_path_factory.mktemp("hf") / "vit-tiny"
    hf_classifier.save_pretrained(path)
    return path


def _ours(state_dict, fmt, hf_config, fused: bool) -> VisionTransformer:
    sd, _ = convert_hf(state_dict, hf_config)
    vit = VisionTransformer(vit_config_for(state_dict, fmt, hf_config), fused_attn=fused).eval()
    vit.load_state_dict(sd)
    return vit


@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_parity_with_hf_vit_model(images, fused):
    torch.manual_seed(1)
    hf = transformers.ViTModel(_hf_vit_config()).eval()  # unprefixed names, with a pooler
    sd = hf.state_dict()
    assert detect_format(sd) == "hf-vit"
    cfg = vit_config_for(sd, "hf-vit", hf.config.to_dict(), num_classes=4)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size, cfg.ln_eps) == (48, 2, 3, 32, 1e-12)
    ours = VisionTransformer(cfg, fused_attn=fused).eval()
    converted, _ = convert_hf(sd, hf.config.to_dict())
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    want = hf(pixel_values=images).last_hidden_state
    got = ours.norm(ours.forward_blocks(ours.forward_embed(images), 0, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_parity_with_hf_classifier_in_memory_names(images, hf_classifier, fused):
    sd = hf_classifier.state_dict()  # transformers 5 names: layers.N.attention.q_proj, mlp.fc1, ...
    assert any(".q_proj." in k for k in sd)
    ours = _ours(sd, "hf-vit", hf_classifier.config.to_dict(), fused)
    torch.testing.assert_close(ours(images), hf_classifier(pixel_values=images).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_parity_through_a_saved_hub_directory(images, hf_classifier, hf_dir):
    raw = load_state_dict_file(hf_dir / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in raw  # the Hub's names
    ck = read_checkpoint(hf_dir)  # a directory: picks model.safetensors, reads config.json beside it
    assert ck.format == "hf-vit" and ck.fields["num_heads"] == 3 and ck.fields["ln_eps"] == 1e-12
    vit = VisionTransformer(ViTConfig(**{**TINY.to_dict(), "ln_eps": 1e-12})).eval()
    notes = init_from(vit, hf_dir, num_classes=5)
    assert notes == [f"loaded hf-vit checkpoint {hf_dir / 'model.safetensors'}"]
    torch.testing.assert_close(vit(images), hf_classifier(pixel_values=images).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_hf_bin_file_into_a_preset_with_another_eps_and_class_count(tmp_path, images, hf_dir):
    path = tmp_path / "pytorch_model.bin"
    torch.save(
        {"state_dict": load_state_dict_file(hf_dir / "model.safetensors")}, path
    )  # no config.json here
    vit = VisionTransformer(ViTConfig(**{**TINY.to_dict(), "num_classes": 7}))
    notes = init_from(vit, path, num_classes=7)
    assert "checkpoint used LayerNorm eps 1e-12; the model uses 1e-06" in notes
    assert "checkpoint does not record num_heads; assumed the model's 3" in notes
    assert "head re-initialised: checkpoint has 5 classes, the model needs 7" in notes
    src, _ = convert_hf(load_state_dict_file(path))
    assert torch.equal(vit.blocks[1].attn.qkv.weight, src["blocks.1.attn.qkv.weight"])
    assert vit.head.weight.shape == (7, 48) and torch.count_nonzero(vit.head.bias) == 0


def test_hf_config_disagreeing_with_the_preset_is_refused(tmp_path, hf_classifier):
    path = tmp_path / "hf6"
    hf = transformers.ViTForImageClassification(_hf_vit_config(num_attention_heads=6, num_labels=5))
    hf.save_pretrained(path)
    with pytest.raises(CheckpointError, match="num_heads 6, the model has 3"):
        init_from(VisionTransformer(TINY), path, num_classes=5)
    with pytest.raises(CheckpointError, match="hidden_act 'gelu_new'"):
        convert_hf(hf_classifier.state_dict(), {**hf_classifier.config.to_dict(), "hidden_act": "gelu_new"})
    with pytest.raises(CheckpointError, match="num_hidden_layers=12 disagrees with the weights"):
        convert_hf(hf_classifier.state_dict(), {"num_hidden_layers": 12})


def test_distilled_deit_is_a_clear_error():
    hf = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**HF_ARGS, num_labels=5))
    sd = hf.state_dict()
    assert detect_format(sd) == "hf-deit"
    with pytest.raises(CheckpointError, match=r"'deit\.embeddings\.distillation_token'.*distilled DeiT"):
        convert_hf(sd)


@torch.no_grad()
def test_deit_without_distillation_token_converts(images):
    hf = transformers.DeiTForImageClassification(transformers.DeiTConfig(**HF_ARGS, num_labels=5))
    sd = {k: v for k, v in hf.state_dict().items() if "distillation" not in k}
    pos = sd["deit.embeddings.position_embeddings"]  # (1, cls + dist + patches, C)
    sd["deit.embeddings.position_embeddings"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    assert detect_format(sd) == "hf-deit"
    out, fields = convert_hf(sd, hf.config.to_dict())
    assert fields["num_classes"] == 5 and torch.equal(out["head.weight"], sd["classifier.weight"])


def test_unknown_hf_tensor_is_named():
    sd = transformers.ViTModel(_hf_vit_config()).state_dict()
    sd["encoder.layer.0.attention.attention.rel_pos"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.0\.attention\.attention\.rel_pos' \(3,\)"):
        convert_hf(sd)


@torch.no_grad()
def test_timm_state_dict_round_trips_in_any_container(tmp_path, images):
    torch.manual_seed(2)
    src = VisionTransformer(TINY).eval()
    sd = src.state_dict()
    for i, obj in enumerate(
        [sd, {"model": sd, "epoch": 3}, {"state_dict": {f"module.{k}": v for k, v in sd.items()}}]
    ):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(obj, path)
        assert detect_format(torch.load(path, weights_only=True)) == "timm"
        dst = VisionTransformer(TINY).eval()
        assert init_from(dst, path, num_classes=5) == [
            f"loaded timm checkpoint {path}",
            "checkpoint does not record num_heads; assumed the model's 3",
        ]
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), k
        torch.testing.assert_close(dst(images), src(images), rtol=0, atol=0)


def test_timm_config_is_derived_from_shapes():
    sd = VisionTransformer(TINY).state_dict()
    assert vit_config_for(sd, "timm", num_heads=3) == TINY
    with pytest.raises(CheckpointError, match="embed_dim 48 is not a multiple of 64: pass num_heads"):
        vit_config_for(sd, "timm")
    sd = VisionTransformer(ViTConfig(**{**TINY.to_dict(), "embed_dim": 128, "num_heads": 2})).state_dict()
    assert vit_config_for(sd, "timm").num_heads == 2  # timm's head width of 64


def test_polymorphd_checkpoint_and_run_directory(tmp_path, tiny_run):
    cfg = ViTConfig(**{**TINY.to_dict(), "num_heads": 6, "ln_eps": 1e-5})
    src = VisionTransformer(cfg)
    save_checkpoint(tmp_path / "vit.pt", src)
    raw = torch.load(tmp_path / "vit.pt", weights_only=True)
    assert detect_format(raw) == "polymorphd"
    assert vit_config_for(raw, "polymorphd") == cfg
    dst = VisionTransformer(cfg)
    assert init_from(dst, tmp_path / "vit.pt", num_classes=5) == [
        f"loaded polymorphd checkpoint {tmp_path / 'vit.pt'}"
    ]
    assert torch.equal(dst.pos_embed, src.pos_embed)
    with pytest.raises(CheckpointError, match="num_heads 6, the model has 3"):
        init_from(VisionTransformer(TINY), tmp_path / "vit.pt", num_classes=5)
    # a training run directory: backbone.pt plus the config.json that records the architecture
    ck = read_checkpoint(tiny_run)
    assert ck.format == "polymorphd" and ck.path.name == "backbone.pt" and ck.fields["depth"] == 4


def _save(tmp_path, sd, name="bad.pt"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_wrong_shape_missing_and_unknown_tensors_are_named(tmp_path):
    sd = VisionTransformer(TINY).state_dict()
    bad = {**sd, "blocks.1.mlp.fc1.weight": torch.zeros(100, 48)}
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight: found \(100, 48\), expected \(192, 48\)"
    ):
        init_from(VisionTransformer(TINY), _save(tmp_path, bad), num_classes=5)
    bad = {k: v for k, v in sd.items() if k != "blocks.0.norm2.bias"}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm2\.bias: found nothing, expected \(48,\)"):
        init_from(VisionTransformer(TINY), _save(tmp_path, bad), num_classes=5)
    bad = {**sd, "blocks.0.ls1.gamma": torch.ones(48)}
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ls1\.gamma: found \(48,\), expected no such tensor"
    ):
        init_from(VisionTransformer(TINY), _save(tmp_path, bad), num_classes=5)


def test_deeper_checkpoint_says_which_architecture_differs(tmp_path):
    sd = VisionTransformer(ViTConfig(**{**TINY.to_dict(), "depth": 3})).state_dict()
    with pytest.raises(CheckpointError, match=r"blocks\.2\.norm1\.weight.*depth=3 \(model: 2\)"):
        init_from(VisionTransformer(TINY), _save(tmp_path, sd), num_classes=5)


@torch.no_grad()
def test_pos_embed_is_resampled_when_the_grid_differs(tmp_path):
    small = ViTConfig(**{**TINY.to_dict(), "img_size": 16})  # 2x2 patch grid
    sd = VisionTransformer(small).state_dict()
    sd["pos_embed"] = torch.full((1, 5, 48), 0.25)
    sd["pos_embed"][0, 0] = 7.0  # the class position is kept as is
    del sd["head.weight"], sd["head.bias"]  # a backbone-only file
    vit = VisionTransformer(TINY)
    notes = init_from(vit, _save(tmp_path, sd), num_classes=5)
    assert "pos_embed resampled bicubically from a 2x2 to a 4x4 patch grid" in notes
    assert "head re-initialised: checkpoint has no classifier head, the model needs 5" in notes
    assert vit.pos_embed.shape == (1, 17, 48)
    assert torch.equal(vit.pos_embed[0, 0], torch.full((48,), 7.0))
    torch.testing.assert_close(vit.pos_embed[0, 1:], torch.full((16, 48), 0.25))  # constants stay constant


def test_resample_same_grid_is_identity_and_shrinking_works():
    pos = torch.randn(1, 17, 8)
    torch.testing.assert_close(resample_pos_embed(pos, 4), pos)
    assert resample_pos_embed(pos, 2).shape == (1, 5, 8)


def test_unknown_format_lists_what_it_saw(tmp_path):
    with pytest.raises(
        CheckpointError, match=r"unknown checkpoint format: 1 tensors, e\.g\. \['encoder\.w'\]"
    ):
        init_from(VisionTransformer(TINY), _save(tmp_path, {"encoder.w": torch.zeros(2)}), num_classes=5)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_state_dict_file(_save(tmp_path, {"epoch": 3}))
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict_file(_save(tmp_path, [torch.zeros(1)]))


def test_file_problems_are_checkpoint_errors(tmp_path, monkeypatch, hf_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"suffix '\.npz': expected one of"):
        load_state_dict_file(tmp_path / "w.npz")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"torch\.load\(weights_only=True\)"):
        load_state_dict_file(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="has none of"):
        read_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="num_classes 9 differs from the model's 5"):
        init_from(VisionTransformer(TINY), hf_dir, num_classes=9)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match="pip install safetensors"):
        load_state_dict_file(hf_dir / "model.safetensors")
