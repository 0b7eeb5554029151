"""ONNX parity of the audiovisual graphs: the mel front end, the audio-token exit with its count head, and the
tail with the final block's count head (export/plan.audio_graphs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymorphd.export.core.timing import session
from polymorphd.export.onnx import ATOL, check_graph, export_graph
from polymorphd.export.plan import audio_graphs
from polymorphd.models.core.errors import BundleError
from polymorphd.models.core.melspec import MelConfig, log_mel
from polymorphd.models.nn.audio import AudioVisualExit, CountHead
from polymorphd.models.nn.exits import ExitConfig
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig

MEL = MelConfig()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=4, num_heads=3)
    vit = VisionTransformer(cfg).eval()
    exits = [
        AudioVisualExit(cfg, ExitConfig(after_block=b, width=24, num_heads=2), MEL).eval() for b in (1, 2)
    ]
    specs = {s.name: s for s in audio_graphs(vit, exits, CountHead(cfg.embed_dim).eval(), 2, MEL)}
    out = tmp_path_factory.mktemp("av")
    diffs = {name: export_graph(s, out / s.file) for name, s in specs.items()}
    return specs, out, diffs


def test_every_audiovisual_graph_equals_torch(exported):
    specs, out, diffs = exported
    assert sorted(specs) == ["exit_0", "exit_1", "mel", "tail_count"]
    for name, spec in specs.items():
        assert diffs[name] <= ATOL
        assert check_graph(spec, out / spec.file, seed=5, batch=3) <= ATOL  # batch 3: the dynamic B


def test_the_exit_graph_outputs_probs_and_count(exported):
    _specs, out, _ = exported
    sess = session(out / "exit_0.onnx")
    assert [i.name for i in sess.get_inputs()] == ["tokens", "mel"]
    assert [o.name for o in sess.get_outputs()] == ["probs", "count"]
    tokens = np.random.default_rng(0).standard_normal((2, 17, 48)).astype(np.float32)
    mel = np.full((2, MEL.n_mels, MEL.frames), -10.0, dtype=np.float32)
    probs, count = sess.run(None, {"tokens": tokens, "mel": mel})
    assert probs.shape == (2, 10) and count.shape == (2,)
    assert ((probs > 0) & (probs < 1)).all()


def test_the_onnx_front_end_equals_the_numpy_one(exported):
    _, out, _ = exported
    x = np.random.default_rng(1).uniform(-0.3, 0.3, (2, MEL.samples)).astype(np.float32)
    got = session(out / "mel.onnx").run(None, {"audio": x})[0]
    assert np.abs(got - log_mel(x, MEL)).max() < 1e-3


def test_a_count_output_that_differs_is_caught_and_named(exported):
    specs, out, _ = exported
    # exit_1's graph checked against exit_0's module: same inputs, other weights
    with pytest.raises(
        BundleError, match=r"exit_1\.onnx: ONNX Runtime differs from torch by .* in output 'probs'"
    ):
        check_graph(specs["exit_0"], out / "exit_1.onnx")
