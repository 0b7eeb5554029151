"""The audio front end, the audiovisual exit and the count heads (models/nn/audio.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymorphd.models.core.melspec import MelConfig, log_mel
from polymorphd.models.nn.audio import AudioVisualExit, CountHead, MelFrontEnd
from polymorphd.models.nn.exits import ExitConfig, SLViTExit
from polymorphd.models.nn.vit import ViTConfig

VIT = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=4, num_heads=3)
EXIT = ExitConfig(after_block=1, width=24, num_heads=2)
MEL = MelConfig()


def test_torch_front_end_equals_numpy():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (4, MEL.samples)).astype(np.float32)
    got = MelFrontEnd(MEL)(torch.from_numpy(x)).numpy()
    assert got.shape == (4, MEL.n_mels, MEL.frames)
    assert np.abs(got - log_mel(x, MEL)).max() < 1e-3


def test_audio_tokens_join_the_exit_attention_and_change_its_answer():
    torch.manual_seed(0)
    ex = AudioVisualExit(VIT, EXIT, MEL).eval()
    tokens = torch.randn(2, VIT.num_tokens, VIT.embed_dim)
    mel = torch.randn(2, MEL.n_mels, MEL.frames)
    logits, count = ex.forward_all(tokens, mel)
    assert logits.shape == (2, VIT.num_classes) and count.shape == (2,)
    other, _ = ex.forward_all(tokens, mel + 3.0)
    assert not torch.allclose(logits, other)  # the audio is heard
    with pytest.raises(ValueError, match="fuses audio: pass the frame's log-mel window"):
        ex(tokens)


def test_the_visual_exit_with_a_count_head_is_the_sl_vit_exit():
    torch.manual_seed(0)
    visual = AudioVisualExit(VIT, EXIT, None).eval()
    plain = SLViTExit(VIT, EXIT).eval()
    plain.load_state_dict({k: v for k, v in visual.state_dict().items() if not k.startswith("count_head")})
    tokens = torch.randn(3, VIT.num_tokens, VIT.embed_dim)
    assert torch.equal(visual(tokens), plain(tokens))


def test_count_heads_learn_a_count_with_l1():
    torch.manual_seed(0)
    head = CountHead(8)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).float() + (x[:, 1] > 0).float()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        loss = torch.nn.functional.l1_loss(head(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_the_count_loss_trains_the_count_head_and_leaves_the_label_layers_alone():
    torch.manual_seed(0)
    ex = AudioVisualExit(VIT, EXIT, MEL)
    tokens = torch.randn(4, VIT.num_tokens, VIT.embed_dim)
    mel = torch.randn(4, MEL.n_mels, MEL.frames)
    _, count = ex.forward_all(tokens, mel)
    torch.nn.functional.l1_loss(count, torch.tensor([0.0, 1.0, 2.0, 3.0])).backward()
    grads = {n: p.grad for n, p in ex.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("count_head"))
    # the stop-gradient: no layer the labels use moves for the count (issue 14c: it cost 0.05 mAP)
    assert all(g is None for n, g in grads.items() if not n.startswith("count_head"))


def test_a_count_gradient_share_reaches_the_label_layers_scaled_and_leaves_the_count_unchanged():
    tokens = torch.randn(4, VIT.num_tokens, VIT.embed_dim)
    mel = torch.randn(4, MEL.n_mels, MEL.frames)
    target = torch.tensor([0.0, 1.0, 2.0, 3.0])
    grads, counts = {}, {}
    for share in (1.0, 0.1):
        torch.manual_seed(0)
        ex = AudioVisualExit(VIT, EXIT, MEL, count_grad=share)
        _, counts[share] = ex.forward_all(tokens, mel)
        torch.nn.functional.l1_loss(counts[share], target).backward()
        grads[share] = ex.block.attn.qkv.weight.grad.clone()
    torch.testing.assert_close(counts[0.1], counts[1.0])
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0])
    with pytest.raises(ValueError, match=r"count_grad is a share .* in \[0, 1\], got 1.5"):
        AudioVisualExit(VIT, EXIT, MEL, count_grad=1.5)
