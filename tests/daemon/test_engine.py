"""The engine on a real tiny bundle, against a torch reference built from the same run's modules."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polymorphd.daemon.engine import MODES, Engine, is_adapter_bundle, load_engine
from polymorphd.daemon.policy import ContextPolicy
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.core.knobs import PolicyKnobs
from polymorphd.models.core.preprocess import InputSpec, preprocess

torch = pytest.importorskip("torch")

ATOL = 1e-4
OFF = [[0.0, 1.0], [0.0, 1.0]]  # thresholds that never decide: every frame reaches the tail


class Reference:
    """The tiny run's torch modules, run the way the bundle's graphs are meant to."""

    def __init__(self, run_dir: Path) -> None:
        from polymorphd.models.train.run import load_run

        self.run = load_run(run_dir)
        self.vit = self.run.vit
        self.spec = InputSpec.from_dict(self.run.config["input"])
        self.start = self.run.vit_config.depth - self.run.lora.last_blocks
        self.class_thr = np.asarray(self.run.calibration["class_thresholds"], dtype=np.float32)

    @torch.no_grad()
    def tokens(self, frame: np.ndarray, end: int) -> torch.Tensor:
        x = torch.from_numpy(preprocess(frame, self.spec))
        return self.vit.forward_blocks(self.vit.forward_embed(x), 0, end)

    @torch.no_grad()
    def full(self, frame: np.ndarray) -> np.ndarray:
        return torch.sigmoid(self.vit(torch.from_numpy(preprocess(frame, self.spec))))[0].numpy()

    @torch.no_grad()
    def exit(self, frame: np.ndarray, j: int) -> np.ndarray:
        ec = self.run.exit_configs[j]
        return torch.sigmoid(self.run.exits[j](self.tokens(frame, ec.after_block)))[0].numpy()

    def published(self, p_exit: np.ndarray) -> np.ndarray:
        """A centred exit's scores on the final classifier's scale: sigmoid(logit(p) + logit(threshold))."""
        z = np.log(p_exit / (1 - p_exit)) + np.log(self.class_thr / (1 - self.class_thr))
        return 1 / (1 + np.exp(-z))

    @torch.no_grad()
    def adapters(self, frame: np.ndarray, chosen: list[int]) -> np.ndarray:
        from polymorphd.models.nn.lora import compose

        logits = compose(self.vit, self.tokens(frame, self.start), [self.run.adapters[c] for c in chosen])
        return torch.sigmoid(logits).numpy()

    def polymorph(self, frames: list[np.ndarray], cfg: PolicyKnobs) -> list[tuple[np.ndarray, list[int]]]:
        """The polymorph loop with exits off: select on the last exit, batched adapters, merge, observe."""
        policy = ContextPolicy(self.run.contexts, len(self.class_thr), cfg)
        state = policy.new_state()
        out = []
        for f in frames:
            p_exit = self.exit(f, len(self.run.exits) - 1)
            chosen = policy.select(state, p_exit)
            kept = self.published(p_exit)
            probs = policy.merge(kept, self.adapters(f, chosen), chosen) if chosen else self.full(f)
            policy.observe(state, probs > self.class_thr)
            out.append((probs, chosen))
        return out


@pytest.fixture(scope="module")
def ref(tiny_run) -> Reference:
    return Reference(tiny_run)


@pytest.fixture(scope="module")
def loaded(tiny_bundle) -> Engine:
    e = load_engine(tiny_bundle, threads=1)
    yield e
    e.close()


@pytest.fixture()
def engine(loaded) -> Engine:
    """The module's engine with the bundle's default knobs (loading verifies every graph: do it once)."""
    defaults = getattr(loaded, "_test_defaults", None) or loaded.knobs()
    loaded._test_defaults = defaults
    loaded.set_knobs(**defaults)
    return loaded


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n)]


def test_full_mode_equals_torch(engine, ref):
    engine.set_knobs(mode="full")
    for f in frames(3):
        r = engine.infer(f, engine.new_state())
        want = ref.full(f)
        np.testing.assert_allclose(r.probs, want, atol=ATOL)
        assert r.labels == np.flatnonzero(r.probs > ref.class_thr).tolist()
        assert (r.exit, r.adapters, r.mode) == ("final", [], "full")
        g = engine.manifest["gflops"]
        assert r.gflops == pytest.approx(sum(g["segments"]) + g["tail"])


def test_early_exit_taken_and_not_taken_by_thresholds(engine, ref):
    f = frames(1, seed=3)[0]
    p0, p1 = ref.exit(f, 0), ref.exit(f, 1)
    engine.set_knobs(mode="early-exit", exit_thresholds=OFF)
    r = engine.infer(f)
    assert r.exit == "final"
    np.testing.assert_allclose(r.probs, ref.full(f), atol=ATOL)

    # exit 0 decides when every class is below lo or above hi: lo = hi = 0.5 always decides
    engine.set_knobs(exit0_lo=0.5, exit0_hi=0.5)
    r = engine.infer(f)
    assert r.exit == 0
    np.testing.assert_allclose(r.probs, ref.published(p0), atol=ATOL)
    assert r.labels == np.flatnonzero(p0 > 0.5).tolist()  # at an exit: its own (centred) probs > hi

    # a band that contains one of exit 0's probabilities keeps the frame going; exit 1 decides
    mid = float(np.sort(p0)[len(p0) // 2])
    engine.set_knobs(exit0_lo=mid - 1e-3, exit0_hi=mid + 1e-3, exit1_lo=0.0, exit1_hi=float(p1.min()) - 1e-3)
    r = engine.infer(f)
    assert r.exit == 1
    np.testing.assert_allclose(r.probs, ref.published(p1), atol=ATOL)
    assert r.labels == list(range(len(p1)))  # every class above hi
    g = engine.manifest["gflops"]
    assert r.gflops == pytest.approx(sum(g["segments"][:2]) + sum(g["exits"][:2]))


@pytest.mark.parametrize("mode", ["polymorph", "switching", "merged"])
def test_context_modes_equal_torch_reference_over_a_stream(engine, ref, mode):
    cfg = PolicyKnobs(max_adapters=2, recall_threshold=0.45, keep_frames=1, refresh_every=3)
    engine.set_knobs(mode=mode, exit_thresholds=OFF, max_adapters=2, recall_threshold=0.45, keep_frames=1,
                     refresh_every=3)  # fmt: skip
    fs = frames(4, seed=11)
    want = ref.polymorph(fs, cfg)
    state = engine.new_state()
    ran = 0
    for f, (probs, chosen) in zip(fs, want, strict=True):
        r = engine.infer(f, state)
        assert r.adapters == [engine.context_ids[c] for c in chosen]
        np.testing.assert_allclose(r.probs, probs, atol=ATOL)
        assert r.labels == np.flatnonzero(probs > ref.class_thr).tolist()
        ran += len(chosen)
    assert ran > 0, "the reference never chose an adapter: the test would not test anything"


def test_polymorph_merges_adapters_and_keeps_exit_scores_for_uncovered_classes(engine, ref):
    f = frames(1, seed=5)[0]
    engine.set_knobs(mode="polymorph", exit_thresholds=OFF, max_adapters=1, recall_threshold=0.01)
    r = engine.infer(f, engine.new_state())
    assert len(r.adapters) == 1
    c = engine.context_ids.index(r.adapters[0])
    members = engine.contexts[c]
    adapter = ref.adapters(f, [c])[0]
    p_exit = ref.exit(f, 1)
    others = [k for k in range(len(p_exit)) if k not in members]
    np.testing.assert_allclose(r.probs[members], adapter[members], atol=ATOL)
    np.testing.assert_allclose(r.probs[others], ref.published(p_exit)[others], atol=ATOL)
    assert not np.allclose(ref.published(p_exit), p_exit, atol=1e-3)  # the scale change is exercised
    g = engine.manifest["gflops"]
    assert r.gflops == pytest.approx(sum(g["segments"]) + sum(g["exits"]) + g["tail_lora_per_adapter"])


def test_empty_selection_falls_back_to_generalist_tail(engine, ref):
    f = frames(1, seed=2)[0]
    # nothing above the recall threshold on the first frame (no history): no adapter, generalist tail
    engine.set_knobs(mode="polymorph", exit_thresholds=OFF, recall_threshold=0.999, surprise_jaccard=0.0)
    r = engine.infer(f, engine.new_state())
    assert r.adapters == [] and r.exit == "final"
    np.testing.assert_allclose(r.probs, ref.full(f), atol=ATOL)


def test_frame_result_timings_and_repeat_set_reuse(engine):
    engine.set_knobs(mode="polymorph", exit_thresholds=OFF, recall_threshold=0.01)
    state = engine.new_state()
    f = frames(1)[0]
    r1 = engine.infer(f, state)
    cached = engine.bank.stacked(tuple(engine.context_ids.index(c) for c in r1.adapters))
    r2 = engine.infer(f, state)
    assert r2.adapters == r1.adapters
    assert engine.bank.stacked(tuple(engine.context_ids.index(c) for c in r2.adapters)) is cached
    assert r2.infer_t0_ns <= r2.infer_t1_ns
    assert r2.inference_ms >= r2.ort_ms > 0
    assert r2.overhead_ms == pytest.approx(r2.inference_ms - r2.ort_ms)


def test_merged_mode_merges_only_when_the_set_changes(engine):
    engine.set_knobs(mode="merged", exit_thresholds=OFF, recall_threshold=0.01, max_adapters=2)
    g = engine.manifest["gflops"]
    state = engine.new_state()
    f = frames(1)[0]
    r1 = engine.infer(f, state)
    r2 = engine.infer(f, state)
    assert r1.adapters and r2.adapters == r1.adapters
    base = sum(g["segments"]) + sum(g["exits"]) + len(r1.adapters) * g["tail"]
    assert r2.gflops == pytest.approx(base)  # merged weights reused
    assert r1.gflops > base  # the first frame paid for merging


def test_grayscale_and_any_size_frames_are_accepted_bad_shapes_are_not(engine):
    engine.infer(np.zeros((17, 90, 3), np.uint8))
    engine.infer(np.zeros((64, 64), np.uint8))
    for bad in (np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3), np.float32), np.zeros(5, np.uint8)):
        with pytest.raises(ValueError, match=r"shape|dtype"):
            engine.infer(bad)
    with pytest.raises(ValueError, match="numpy array"):
        engine.infer([[1, 2, 3]])


def test_set_knobs_validates_everything_before_applying(engine):
    before = engine.knobs()
    assert before["mode"] == "polymorph" and len(before["exit_thresholds"]) == 2
    cases = [
        ({"nope": 1}, "unknown knob 'nope'"),
        ({"mode": "fast"}, "mode 'fast' invalid"),
        ({"max_adapters": 0}, "max_adapters must be an integer >= 1"),
        ({"max_adapters": 1.5}, "expected an integer"),
        ({"recall_threshold": "high"}, "expected a number"),
        ({"recall_threshold": True}, "expected a number"),
        ({"exit0_lo": 0.9, "exit0_hi": 0.1}, "exit 0 thresholds lo=0.9, hi=0.1 invalid"),
        ({"exit5_hi": 0.9}, "has 2 exit"),
        ({"exit_thresholds": [[0.1, 0.9]]}, "list of 2"),
        ({"mode": "full", "keep_frames": -1}, "keep_frames"),
    ]
    for knobs, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            engine.set_knobs(**knobs)
        assert engine.knobs() == before  # nothing applied
    got = engine.set_knobs(max_adapters="3", exit1_hi="0.8", refresh_every=5.0, mode="early-exit")
    assert (got["max_adapters"], got["exit1_hi"], got["refresh_every"], got["mode"]) == (
        3,
        0.8,
        5,
        "early-exit",
    )
    assert engine.mode == "early-exit"
    got = engine.set_knobs(exit_thresholds=[{"lo": 0.2, "hi": 0.7}, [0.3, 0.6]])
    assert got["exit_thresholds"] == [[0.2, 0.7], [0.3, 0.6]]


def test_load_errors_name_the_problem(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_engine(tmp_path / "missing")
    with pytest.raises(ConfigError, match="mode 'x' invalid"):
        load_engine(tiny_bundle, mode="x")
    with pytest.raises(ConfigError, match="threads"):
        load_engine(tiny_bundle, threads=0)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    data = bytearray((corrupt / "tail.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "tail.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tail\.onnx"):
        load_engine(corrupt)


def test_manifest_policy_is_checked_by_the_knob_model(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["policy"] = {"max_adapters": 0}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError, match=r"manifest policy or exit thresholds invalid: knob max_adapters must be"
    ):
        load_engine(copy)
    manifest["policy"] = {"max_adapters": 1, "from_a_newer_trainer": 7}  # unknown settings are ignored
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_engine(copy).knobs()["max_adapters"] == 1


def test_adapter_bundle_is_refused_as_a_base(swap_bundle, tiny_bundle):
    assert is_adapter_bundle(swap_bundle) and not is_adapter_bundle(tiny_bundle)
    assert not is_adapter_bundle(tiny_bundle / "nowhere")
    with pytest.raises(BundleError, match="adapter bundle"):
        load_engine(swap_bundle)


def test_adapter_bundle_swap_shares_the_trunk(
    engine, swap_bundle, swap_run, tiny_bundle, foreign_adapter_bundle
):
    engine.set_knobs(mode="polymorph", exit_thresholds=OFF, max_adapters=1, recall_threshold=0.01)
    new = engine.with_adapter_bundle(swap_bundle)
    assert new.trunk is engine.trunk
    assert new.contexts == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and new.bundle_id.endswith("@2")
    assert new.knobs()["max_adapters"] == 1 and new.knobs()["exit_thresholds"] == OFF  # knobs carried over
    np.testing.assert_allclose(new.class_thresholds, 0.45)
    ref = Reference(swap_run)
    f = frames(1, seed=9)[0]
    r = new.infer(f, new.new_state())
    assert len(r.adapters) == 1
    c = new.context_ids.index(r.adapters[0])
    members = new.contexts[c]
    np.testing.assert_allclose(r.probs[members], ref.adapters(f, [c])[0][members], atol=ATOL)
    engine.infer(f)  # the old engine still serves
    with pytest.raises(BundleError, match="base"):
        engine.with_adapter_bundle(foreign_adapter_bundle)
    with pytest.raises(BundleError, match="full bundle"):
        engine.with_adapter_bundle(tiny_bundle)


def test_missing_provider_falls_back_to_cpu_with_a_warning(tiny_bundle, caplog):
    caplog.set_level(logging.WARNING)
    e = load_engine(tiny_bundle, providers=("CUDAExecutionProvider", "CPUExecutionProvider"), threads=1)
    assert e.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


def test_every_mode_runs(engine):
    f = frames(1)[0]
    for mode in MODES:
        engine.set_knobs(mode=mode)
        r = engine.infer(f)
        assert r.probs.shape == (len(engine.classes),) and r.mode == mode


def test_engine_runs_with_torch_unimportable(tiny_bundle):
    code = (
        "import sys\n"
        "for m in ('torch', 'onnx', 'onnxscript', 'transformers', 'sklearn'): sys.modules[m] = None\n"
        "import numpy as np\n"
        "import polymorphd.daemon.tools.bench, polymorphd.daemon.tools.evaluate\n"
        "from polymorphd.daemon.engine import load_engine, MODES\n"
        f"e = load_engine({str(tiny_bundle)!r}, threads=1)\n"
        "for m in MODES:\n"
        "    e.set_knobs(mode=m)\n"
        "    e.infer(np.zeros((32, 32, 3), np.uint8))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _with_class_recall(tiny_bundle, tmp_path, block) -> Path:
    copy = tmp_path / "class_recall"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["policy"]["class_recall"] = block
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _class_recall_block(manifest: dict, cuts: list[float], **over) -> dict:
    last = manifest["exits"][-1]["after_block"]
    k = len(manifest["classes"])
    block = {"version": 1, "target": 0.9, "exit_after_block": last, "min_positives": 20, "pooled": 0.3}
    return block | {"thresholds": (cuts * k)[:k]} | over


def test_manifest_with_and_without_per_class_recall_loads_and_selects_by_it(engine, tiny_bundle, tmp_path):
    """A bundle without policy.class_recall keeps the single recall_threshold; with it, the per-class cuts
    decide what is likely: cuts of 1 make nothing likely (no adapter runs), cuts of 0 everything."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert "class_recall" not in manifest["policy"] and engine.class_recall is None
    f = frames(1, seed=5)[0]
    knobs = {"mode": "polymorph", "exit_thresholds": OFF, "max_adapters": 1, "recall_threshold": 0.01}
    engine.set_knobs(**knobs)
    assert len(engine.infer(f, engine.new_state()).adapters) == 1
    for cut, adapters in ((1.0, 0), (0.0, 2)):
        path = _with_class_recall(tiny_bundle, tmp_path / str(cut), _class_recall_block(manifest, [cut]))
        e = load_engine(path)
        np.testing.assert_array_equal(e.class_recall, np.full(len(e.classes), cut, dtype=np.float32))
        e.set_knobs(**(knobs | {"max_adapters": 2}))  # rebuilding the policy keeps the cuts
        assert len(e.infer(f, e.new_state()).adapters) == adapters
        e.close()


def test_per_class_recall_block_is_checked_and_a_newer_version_is_ignored(tiny_bundle, tmp_path):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    bad = [
        (_class_recall_block(manifest, [0.2])["thresholds"][:3], "needs 10 thresholds, got list"),
        (_class_recall_block(manifest, [0.2], thresholds=[0.2] * 3), "needs 10 thresholds, got 3"),
        (_class_recall_block(manifest, [1.5]), r"class_recall\.thresholds\.0 invalid: .*\[0, 1\]"),
        (_class_recall_block(manifest, [0.2], exit_after_block=0), "fit on the exit after block 0"),
        (_class_recall_block(manifest, [0.2], target=0), r"class_recall\.target invalid"),
    ]
    for i, (block, message) in enumerate(bad):
        with pytest.raises(BundleError, match=message):
            load_engine(_with_class_recall(tiny_bundle, tmp_path / str(i), block))
    newer = _class_recall_block(manifest, [0.2], version=2, thresholds="another layout")
    e = load_engine(_with_class_recall(tiny_bundle, tmp_path / "newer", newer))
    assert e.class_recall is None  # the single recall_threshold, as before the block existed
    e.close()
