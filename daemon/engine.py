"""The inference engine: a verified bundle on ONNX Runtime, one frame at a time, in any mode. Torch-free.

``load_engine`` verifies the bundle (hashes, signature when a key is given) before anything is loaded, opens the
graphs once (``graphs.Trunk``), reads the adapters (``adapters.AdapterBank``) and wires the context policy.
``Engine.infer`` preprocesses one frame into a reused buffer and runs the chosen mode (``modes.Pipeline``). No
camera, network or threads here: the daemon (``app.py``) and ``polymorphd eval`` drive it. One ``infer`` at a
time per Engine; engines derived with ``with_adapter_bundle`` share the trunk sessions (ORT sessions are safe to
run from several threads) but have their own buffers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from polymorphd.daemon.adapters import AdapterBank, read_adapter_file
from polymorphd.daemon.graphs import Clock, Trunk
from polymorphd.daemon.modes import AudioExits, MergedTails, Pipeline
from polymorphd.daemon.policy import ContextPolicy
from polymorphd.export.core.verify import verify_bundle
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.core.knobs import (
    CLASS_RECALL_KEY,
    CLASS_RECALL_VERSION,
    ClassRecall,
    EngineKnobs,
    PolicyKnobs,
    validate,
)
from polymorphd.models.core.melspec import MelConfig
from polymorphd.models.core.modes import MODES, Mode
from polymorphd.models.core.preprocess import InputSpec, preprocess

log = logging.getLogger(__name__)

__all__ = ["MODES", "Engine", "FrameResult", "Mode", "StreamState", "is_adapter_bundle", "load_engine"]


@dataclass
class FrameResult:
    probs: np.ndarray  # (K,) float32 final scores for all classes
    labels: list[int]  # class indices decided present
    exit: int | Literal["final"]  # which exit answered
    adapters: list[int]  # context ids whose adapters ran
    preprocess_ms: float
    inference_ms: float  # everything after preprocessing: ORT calls + engine overhead
    infer_t0_ns: int  # inference window (time.monotonic_ns), for energy integration
    infer_t1_ns: int
    ort_ms: float = 0.0  # time inside session.run calls
    overhead_ms: float = 0.0  # inference_ms - ort_ms: the engine's own Python/numpy work
    gflops: float = 0.0  # of what actually ran (manifest gflops)
    mode: str = "polymorph"
    count: float | None = None  # objects in the frame (audiovisual exits, when a mel window was given)


@dataclass
class StreamState:
    """Per-stream state: the policy's memory of recent labels. Make one per camera/video."""

    policy: Any
    frames: int = 0
    engine_id: int = field(default=0, repr=False)


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    if isinstance(manifest, dict):
        return manifest
    if hasattr(manifest, "to_dict"):
        return manifest.to_dict()
    if dataclasses.is_dataclass(manifest):
        return dataclasses.asdict(manifest)
    raise TypeError(f"unexpected manifest type {type(manifest).__name__}")


def _verified(path: str | Path, pubkey: str | Path | None) -> tuple[Path, dict[str, Any]]:
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a bundle directory" if root.exists() else "does not exist"
        raise BundleError(f"bundle {root} {what}; pass the directory that holds manifest.json")
    return root, _manifest_dict(verify_bundle(root, pubkey=pubkey))


def is_adapter_bundle(path: str | Path) -> bool:
    """True when ``path`` holds an adapter bundle (manifest kind "adapters"); False for anything else."""
    try:
        data = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == "adapters"


def load_engine(
    path: str | Path,
    *,
    mode: str = "polymorph",
    providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
    threads: int = 2,
    pubkey: str | Path | None = None,
) -> Engine:
    """Verify the full bundle at ``path`` and load it; BundleError names the file and the problem."""
    validate(EngineKnobs, {"mode": mode})  # before the slow part
    root, manifest = _verified(path, pubkey)
    if manifest.get("kind", "full") != "full":
        raise BundleError(
            f"bundle {root} is an adapter bundle (kind {manifest.get('kind')!r}): load its full base bundle "
            "first, then swap the adapters in (ctl load / Engine.with_adapter_bundle)"
        )
    trunk = Trunk(root, manifest, providers, threads)
    engine = Engine(trunk, manifest, root, manifest, root)
    engine.set_knobs(mode=mode)
    return engine


class Engine:
    """A loaded bundle: ``infer`` frames, change knobs at run time, swap adapter bundles."""

    def __init__(
        self,
        trunk: Trunk,
        base: dict[str, Any],
        base_root: Path,
        adapters: dict[str, Any],
        adapters_root: Path,
    ) -> None:
        self.trunk = trunk
        self.base_manifest, self.manifest = base, adapters
        self.base_root, self.root = base_root, adapters_root
        self.bundle_id = f"{adapters['bundle_id']}@{adapters['version']}"
        self.base_sha256: str = base["base_sha256"]
        self.classes: list[str] = list(base["classes"])
        self.class_ids: list[int] = [int(c) for c in base.get("class_ids", range(len(self.classes)))]
        k = len(self.classes)
        self.contexts: list[list[int]] = [list(c["classes"]) for c in adapters["contexts"]]
        self.context_ids: list[int] = [int(c["id"]) for c in adapters["contexts"]]
        self.spec = InputSpec.from_dict(base["input"])
        self._buf = np.empty((1, 3, self.spec.size, self.spec.size), dtype=np.float32)
        self.bank = AdapterBank(adapters_root, adapters, trunk.tail_lora.inputs, trunk.tail_lora.input_shapes)
        class_thr = np.asarray(adapters.get("class_thresholds", [0.5] * k), dtype=np.float32)
        if class_thr.shape != (k,):
            raise BundleError(
                f"{adapters_root}: class_thresholds has {class_thr.size} values for {k} classes"
            )
        exits = base["exits"]
        # a newer manifest may carry policy settings this version does not know: they are ignored
        known = {n: v for n, v in adapters.get("policy", {}).items() if n in PolicyKnobs.model_fields}
        try:
            self._knobs = validate(EngineKnobs, {**known, "exit_thresholds": [e["threshold"] for e in exits]})
        except ConfigError as exc:
            raise BundleError(f"{adapters_root}: manifest policy or exit thresholds invalid: {exc}") from exc
        self.class_recall = _class_recall(adapters.get("policy", {}), exits, k, adapters_root)
        policy = ContextPolicy(self.contexts, k, self._knobs.policy(), self.class_recall)
        lo, hi = _exit_arrays(self._knobs)
        centred = [bool(e.get("centred", False)) for e in exits]
        audio = base.get("audio")
        self.mel: MelConfig | None = MelConfig(**audio["mel"]) if audio else None
        av = (
            AudioExits(
                np.array([e["threshold"]["lo"] for e in audio["exits"]], dtype=np.float64),
                np.array([e["threshold"]["hi"] for e in audio["exits"]], dtype=np.float64),
                np.array([e["count_margin"] for e in audio["exits"]], dtype=np.float64),
            )
            if audio
            else None
        )
        self._pipe = Pipeline(
            trunk, self.bank, policy, class_thr, lo, hi, base.get("gflops", {}), None, centred, av
        )
        self._overrides: dict[str, Any] = {}
        self._clock = Clock()
        self._default_state: StreamState | None = None
        self._closed = False

    # -- frames ---------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._knobs.mode

    @property
    def num_exits(self) -> int:
        return len(self.trunk.exits)

    @property
    def providers(self) -> list[str]:
        return list(self.trunk.session_providers)

    @property
    def class_thresholds(self) -> np.ndarray:
        return self._pipe.class_thr

    def new_state(self) -> StreamState:
        """Fresh per-stream policy state (a new video, a new camera, or after a swap)."""
        return StreamState(self._pipe.policy.new_state(), engine_id=id(self))

    def infer(
        self, frame_bgr: np.ndarray, state: StreamState | None = None, mel: np.ndarray | None = None
    ) -> FrameResult:
        """One HxWx3 uint8 BGR frame through the current mode; ValueError for a frame of the wrong shape.
        ``mel``: the frame's log-mel window (1, n_mels, frames) from ``self.mel``'s front end; with it a bundle
        with audio exits answers through them and reports the count (ignored by a bundle without)."""
        if self._closed:
            raise RuntimeError(f"engine {self.bundle_id} is closed")
        if state is None:
            state = self._default_state = self._default_state or self.new_state()
        t0 = time.monotonic_ns()
        if not isinstance(frame_bgr, np.ndarray):
            raise ValueError(
                f"frame must be a numpy array (H, W, 3) uint8 BGR, got {type(frame_bgr).__name__}"
            )
        x = preprocess(frame_bgr, self.spec, out=self._buf)
        t1 = time.monotonic_ns()
        clock = self._clock
        clock.ort_ns = 0
        mode = self._knobs.mode
        out = self._pipe.run(mode, x, state.policy, clock, mel if self.mel is not None else None)
        self._pipe.policy.observe(state.policy, out.labels)
        state.frames += 1
        labels = np.flatnonzero(out.labels).tolist()
        adapters = [self.context_ids[c] for c in out.chosen]
        t2 = time.monotonic_ns()
        inference = (t2 - t1) / 1e6
        ort_ms = clock.ort_ns / 1e6
        return FrameResult(
            probs=out.probs,
            labels=labels,
            exit=out.exit,
            adapters=adapters,
            preprocess_ms=(t1 - t0) / 1e6,
            inference_ms=inference,
            infer_t0_ns=t1,
            infer_t1_ns=t2,
            ort_ms=ort_ms,
            overhead_ms=inference - ort_ms,
            gflops=out.gflops,
            mode=mode,
            count=out.count,
        )

    # -- knobs ----------------------------------------------------------------------------------------------
    def knobs(self) -> dict[str, Any]:
        """Current knob values: mode, the policy's, exit thresholds (per side and as a list)."""
        return self._knobs.flat()

    def set_knobs(self, **knobs: Any) -> dict[str, Any]:
        """Validate every knob first, then apply them all; ConfigError names the bad knob. Returns knobs()."""
        new = self._knobs.update(knobs)
        if new.mode == "merged":
            self._ensure_merged()
        # everything validated: apply
        policy = new.policy()
        if policy != self._knobs.policy():
            self._pipe.policy = ContextPolicy(self.contexts, len(self.classes), policy, self.class_recall)
            self._default_state = None
        self._pipe.lo, self._pipe.hi = _exit_arrays(new)
        if new.mode != self._knobs.mode and self._pipe.merged is not None:
            self._pipe.merged.reset()  # entering merged mode again pays the merge again, as a real switch would
        self._knobs = new
        self._overrides.update(knobs)
        log.debug("knobs set: %s", knobs)
        return self.knobs()

    def _ensure_merged(self) -> None:
        if self._pipe.merged is not None:
            return
        tw = self.trunk.tail_weights
        base_file = self.base_manifest.get("tail_base")
        if tw is None or not base_file:
            raise ConfigError(
                f"mode 'merged' needs tail_weights.onnx and its base weights (manifest tail_base); bundle "
                f"{self.base_root} has tail_weights={self.base_manifest.get('tail_weights')!r}, "
                f"tail_base={base_file!r}: re-export it with this polymorphd"
            )
        base = read_adapter_file(self.base_root / base_file)
        self._pipe.merged = MergedTails(base, self.bank, tw.inputs)

    # -- adapter bundles ------------------------------------------------------------------------------------
    def with_adapter_bundle(self, path: str | Path, pubkey: str | Path | None = None) -> Engine:
        """A new Engine with the adapter bundle's contexts, adapters, heads and thresholds over this trunk.

        The adapter bundle's base_sha256 must equal this engine's (BundleError otherwise). Mode and exit
        thresholds carry over, as do knobs set with ``set_knobs`` that the new bundle still accepts.
        """
        root, manifest = _verified(path, pubkey)
        if manifest.get("kind") != "adapters":
            raise BundleError(
                f"bundle {root} is a full bundle (kind {manifest.get('kind', 'full')!r}), not an adapter bundle: "
                "load it as a new engine (load_engine) instead"
            )
        if manifest.get("base_sha256") != self.base_sha256:
            raise BundleError(
                f"{root / 'manifest.json'}: adapter bundle made for base "
                f"{str(manifest.get('base_sha256'))[:12]}..., but the running base is {self.base_sha256[:12]}... "
                f"({self.base_root}): export the adapters against this base, or load the matching full bundle"
            )
        if list(manifest.get("classes", self.classes)) != self.classes:
            raise BundleError(
                f"adapter bundle {root} lists {len(manifest['classes'])} classes that differ from the base's "
                f"{len(self.classes)}: the exits and tails score the base's classes; re-export against this base"
            )
        new = Engine(self.trunk, self.base_manifest, self.base_root, manifest, root)
        new.set_knobs(mode=self.mode, exit_thresholds=self.knobs()["exit_thresholds"])
        carried = {k: v for k, v in self._overrides.items() if k != "mode" and not k.startswith("exit")}
        if carried:
            try:
                new.set_knobs(**carried)
            except ConfigError as exc:
                log.warning("knobs %s not carried over to adapter bundle %s: %s", carried, new.bundle_id, exc)
        log.info("adapter bundle %s loaded over base %s", new.bundle_id, self.base_sha256[:12])
        return new

    def close(self) -> None:
        """Drop this engine's buffers and adapters; trunk sessions live on while another engine uses them."""
        self._closed = True
        self._default_state = None


def _class_recall(
    policy: dict[str, Any], exits: list[dict[str, Any]], k: int, root: Path
) -> np.ndarray | None:
    """The manifest policy's per-class recall thresholds (docs/bundle.md), or None: absent, or of a newer
    block version (the single recall_threshold then, as before the block existed). A malformed block, or one
    fit on another exit than the last, is refused: it would select adapters from the wrong scores."""
    block = policy.get(CLASS_RECALL_KEY)
    if block is None:
        return None
    if isinstance(block, dict) and block.get("version") != CLASS_RECALL_VERSION:
        log.warning(
            "%s: policy.%s version %r unknown (this polymorphd reads %d): using the single recall_threshold",
            root, CLASS_RECALL_KEY, block.get("version"), CLASS_RECALL_VERSION,
        )  # fmt: skip
        return None
    try:
        cr = ClassRecall.model_validate(block) if isinstance(block, dict) else None
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise BundleError(
            f"{root}: manifest policy.{CLASS_RECALL_KEY}.{where} invalid: {e['msg']} (got {e['input']!r:.60})"
        ) from exc
    if cr is None or len(cr.thresholds) != k:
        got = len(cr.thresholds) if cr is not None else type(block).__name__
        raise BundleError(f"{root}: manifest policy.{CLASS_RECALL_KEY} needs {k} thresholds, got {got}")
    last = exits[-1]["after_block"] if exits else None
    if cr.exit_after_block != last:
        raise BundleError(
            f"{root}: manifest policy.{CLASS_RECALL_KEY} was fit on the exit after block "
            f"{cr.exit_after_block}, but the policy reads the last exit's (after block {last}): re-export"
        )
    return np.asarray(cr.thresholds, dtype=np.float32)


def _exit_arrays(knobs: EngineKnobs) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), one entry per exit, as the pipeline reads them."""
    lo = np.array([e.lo for e in knobs.exit_thresholds], dtype=np.float64)
    hi = np.array([e.hi for e in knobs.exit_thresholds], dtype=np.float64)
    return lo, hi
