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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from polymorphd.daemon.adapters import AdapterBank, read_adapter_file
from polymorphd.daemon.graphs import Clock, Trunk
from polymorphd.daemon.modes import MODES, MergedTails, Mode, Pipeline
from polymorphd.daemon.policy import ContextPolicy, PolicyConfig
from polymorphd.export.core.verify import verify_bundle
from polymorphd.models.core.errors import BundleError, ConfigError
from polymorphd.models.core.preprocess import InputSpec, preprocess

log = logging.getLogger(__name__)

__all__ = ["MODES", "Engine", "FrameResult", "Mode", "StreamState", "is_adapter_bundle", "load_engine"]

_EXIT_KNOB = re.compile(r"^exit(\d+)_(lo|hi)$")


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
    _check_mode(mode)
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


def _check_mode(mode: Any) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} invalid: choose one of {', '.join(MODES)}")


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
        lo = np.array([float(e["threshold"]["lo"]) for e in exits], dtype=np.float64)
        hi = np.array([float(e["threshold"]["hi"]) for e in exits], dtype=np.float64)
        self._policy_fields = {f.name: f for f in dataclasses.fields(PolicyConfig)}
        known = {n: v for n, v in adapters.get("policy", {}).items() if n in self._policy_fields}
        try:
            self._policy_cfg = PolicyConfig(**known)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{adapters_root}: manifest policy {known} is invalid: {exc}") from exc
        policy = ContextPolicy(self.contexts, k, self._policy_cfg)
        centred = [bool(e.get("centred", False)) for e in exits]
        self._pipe = Pipeline(
            trunk, self.bank, policy, class_thr, lo, hi, base.get("gflops", {}), None, centred
        )
        self._mode: str = "polymorph"
        self._overrides: dict[str, Any] = {}
        self._clock = Clock()
        self._default_state: StreamState | None = None
        self._closed = False

    # -- frames ---------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

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

    def infer(self, frame_bgr: np.ndarray, state: StreamState | None = None) -> FrameResult:
        """One HxWx3 uint8 BGR frame through the current mode; ValueError for a frame of the wrong shape."""
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
        out = self._pipe.run(self._mode, x, state.policy, clock)
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
            mode=self._mode,
        )

    # -- knobs ----------------------------------------------------------------------------------------------
    def knobs(self) -> dict[str, Any]:
        """Current knob values: mode, the policy's fields, exit thresholds (flat and as a list)."""
        out: dict[str, Any] = {"mode": self._mode, **dataclasses.asdict(self._policy_cfg)}
        pairs = [[float(lo), float(hi)] for lo, hi in zip(self._pipe.lo, self._pipe.hi, strict=True)]
        for i, (lo, hi) in enumerate(pairs):
            out[f"exit{i}_lo"], out[f"exit{i}_hi"] = lo, hi
        out["exit_thresholds"] = pairs
        return out

    def set_knobs(self, **knobs: Any) -> dict[str, Any]:
        """Validate every knob first, then apply them all; ConfigError names the bad knob. Returns knobs()."""
        mode = self._mode
        policy = dataclasses.asdict(self._policy_cfg)
        lo, hi = self._pipe.lo.copy(), self._pipe.hi.copy()
        n_exits = len(lo)
        for name, value in knobs.items():
            if name == "mode":
                _check_mode(value)
                mode = value
            elif name in self._policy_fields:
                policy[name] = _coerce(name, value, type(policy[name]))
            elif name == "exit_thresholds":
                pairs = _pairs(value, n_exits)
                lo[:] = [p[0] for p in pairs]
                hi[:] = [p[1] for p in pairs]
            elif (m := _EXIT_KNOB.match(name)) is not None:
                i = int(m.group(1))
                if i >= n_exits:
                    raise ConfigError(
                        f"knob {name}: this bundle has {n_exits} exit(s), numbered 0..{n_exits - 1}"
                    )
                (lo if m.group(2) == "lo" else hi)[i] = _coerce(name, value, float)
            else:
                valid = ["mode", *self._policy_fields, "exit_thresholds"]
                valid += [f"exit{i}_{s}" for i in range(n_exits) for s in ("lo", "hi")]
                raise ConfigError(f"unknown knob {name!r}; valid knobs are {', '.join(valid)}")
        for i in range(n_exits):
            if not 0.0 <= lo[i] <= hi[i] <= 1.0:
                raise ConfigError(
                    f"exit {i} thresholds lo={lo[i]:g}, hi={hi[i]:g} invalid: need 0 <= lo <= hi <= 1 "
                    "(lo=0, hi=1 disables the exit)"
                )
        try:
            cfg = PolicyConfig(**policy)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"policy knobs {knobs} invalid: {exc}") from exc
        if mode == "merged":
            self._ensure_merged()
        # everything validated: apply
        if cfg != self._policy_cfg:
            self._policy_cfg = cfg
            self._pipe.policy = ContextPolicy(self.contexts, len(self.classes), cfg)
            self._default_state = None
        self._pipe.lo, self._pipe.hi = lo, hi
        if mode != self._mode and self._pipe.merged is not None:
            self._pipe.merged.reset()  # entering merged mode again pays the merge again, as a real switch would
        self._mode = mode
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
                f"adapter bundle {root} was made for base {str(manifest.get('base_sha256'))[:12]}..., but the "
                f"running base is {self.base_sha256[:12]}... ({self.base_root}): export the adapters against "
                "this base, or load the matching full bundle"
            )
        if list(manifest.get("classes", self.classes)) != self.classes:
            raise BundleError(
                f"adapter bundle {root} lists {len(manifest['classes'])} classes that differ from the base's "
                f"{len(self.classes)}: the exits and tails score the base's classes; re-export against this base"
            )
        new = Engine(self.trunk, self.base_manifest, self.base_root, manifest, root)
        new.set_knobs(mode=self._mode, exit_thresholds=self.knobs()["exit_thresholds"])
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


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Knob values arrive from JSON, YAML or ``ctl set K=V``: accept numbers and numeric strings, not bools."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"knob {name}: expected true or false, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"knob {name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ConfigError(f"knob {name}: expected a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ConfigError(f"knob {name}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _pairs(value: Any, n: int) -> list[tuple[float, float]]:
    """``exit_thresholds``: one [lo, hi] (or {"lo":, "hi":}) per exit."""
    if not isinstance(value, list | tuple) or len(value) != n:
        raise ConfigError(
            f"knob exit_thresholds: expected a list of {n} [lo, hi] pairs (one per exit), got {value!r}"
        )
    out = []
    for i, p in enumerate(value):
        if isinstance(p, dict) and set(p) == {"lo", "hi"}:
            p = (p["lo"], p["hi"])
        if not isinstance(p, list | tuple) or len(p) != 2:
            raise ConfigError(f"knob exit_thresholds[{i}]: expected [lo, hi], got {p!r}")
        out.append((_coerce(f"exit{i}_lo", p[0], float), _coerce(f"exit{i}_hi", p[1], float)))
    return out
