"""The daemon's engine seam: what the daemon needs from an engine (Protocols), and the slot that holds it.

``engine.Engine`` (ONNX Runtime) is the implementation the daemon runs; the test doubles in
``tests/daemon/fakes.py`` are another. Both are checked against these Protocols, member by member and
signature by signature (``tests/daemon/test_seam.py``), so the doubles cannot drift from the real engine.
Only what the daemon calls is here: ``eval`` and ``bench`` use more of ``Engine`` and import it directly.

``EngineSlot`` is everything the daemon does with engines: prepare one (load, knobs, warm-up) off the frame
loop, then swap it in, roll back or set knobs on the frame loop, between two frames. Torch-free, and free of
ONNX Runtime too: the engine module is imported by the factory, when a bundle is loaded.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from polymorphd.daemon.config import DaemonConfig
from polymorphd.models.core.errors import BundleError, PolymorphError
from polymorphd.models.core.melspec import LOG_FLOOR

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineFactory", "EngineSlot", "Inference"]


@runtime_checkable
class Inference(Protocol):
    """One frame's answer, as the daemon reads it to publish labels and integrate energy."""

    probs: np.ndarray  # (K,) scores for all classes
    labels: list[int]  # class indices decided present
    exit: int | Literal["final"]  # which exit answered
    adapters: list[int]  # context ids whose adapters ran
    preprocess_ms: float
    inference_ms: float
    infer_t0_ns: int  # inference window (time.monotonic_ns), for the energy meter
    infer_t1_ns: int
    count: float | None  # objects in the frame, from audiovisual exits given a mel window; else None


@runtime_checkable
class Engine(Protocol):
    """A loaded bundle. The daemon runs one ``infer`` at a time, from its frame loop.

    ``new_state`` returns per-stream state that only the engine reads: the daemon hands it back to
    ``infer`` and makes a fresh one after every swap or rollback.

    Audio: an engine whose bundle has audio exits has ``mel`` (its ``MelConfig``; optional, read with
    ``getattr``); given the frame's log-mel window, ``infer`` answers through them with ``count``; without one
    (or without audio exits) it answers exactly as a visual-only engine does, ``count`` None.
    """

    bundle_id: str  # "<bundle_id>@<version>", as published in every label message
    classes: list[str]

    def new_state(self) -> Any: ...

    def infer(self, frame_bgr: np.ndarray, state: Any, mel: np.ndarray | None = None) -> Inference: ...

    def knobs(self) -> dict[str, Any]: ...

    def set_knobs(self, **knobs: Any) -> dict[str, Any]:
        """Validate all, then apply all (ConfigError names the bad knob); returns ``knobs()``."""
        ...

    def with_adapter_bundle(self, path: str, pubkey: str | None) -> Engine:
        """A new engine with the adapter bundle over this one's trunk; this one keeps serving."""
        ...

    def close(self) -> None: ...


class EngineFactory(Protocol):
    """Loads a full bundle: ``engine.load_engine`` in production, a fake backend in tests."""

    def __call__(
        self,
        path: str,
        *,
        mode: str,
        providers: tuple[str, ...],
        threads: int,
        pubkey: str | None,
    ) -> Engine: ...


class EngineSlot:
    """The serving engine, the previous one (for rollback), the stream state and the runtime knob overrides.

    ``prepare`` runs off the frame loop and leaves the serving engine untouched; ``swap``, ``rollback`` and
    ``set_knobs`` run on the frame loop between two frames, so no frame sees half a change.
    """

    def __init__(self, factory: EngineFactory, adapter_check: Callable[[str], bool]) -> None:
        self._factory, self._adapter_check = factory, adapter_check
        self.engine: Engine | None = None
        self.previous: Engine | None = None
        self.state: Any = None  # the serving engine's per-stream state: a fresh one with every engine
        self.overrides: dict[str, Any] = {}  # knobs set at run time: they outlive swaps where they apply
        self._paths: dict[int, str] = {}  # id(engine) -> real path it came from (a `current` symlink moves)
        # highest bundle version served: with a public key configured, a signed bundle of a lower version is
        # refused as an update (TUF-style rollback protection: one signer, one version sequence, whatever the
        # bundle_id); `ctl rollback` stays the operator's way back
        self.max_version = 0

    def prepare(self, path: str, cfg: DaemonConfig) -> Engine:
        """Verify + load + knobs + warm-up; an adapter bundle goes over the serving engine's trunk."""
        if self.engine is not None and self._adapter_check(path):
            new = self.engine.with_adapter_bundle(path, cfg.pubkey)
        else:
            new = self._factory(
                path, mode=cfg.mode, providers=tuple(cfg.providers), threads=cfg.threads, pubkey=cfg.pubkey
            )
        try:
            if cfg.pubkey is not None:
                self._check_version(new, path)
            if cfg.policy:
                new.set_knobs(**cfg.policy)
            for key, value in dict(self.overrides).items():
                try:
                    new.set_knobs(**{key: value})
                except PolymorphError as exc:
                    log.warning("runtime knob %s=%r does not apply to %s: %s", key, value, new.bundle_id, exc)
            state, rng = new.new_state(), np.random.default_rng(0)
            for _ in range(cfg.warmup_runs):  # noise, not black: later exits and adapters get exercised too
                new.infer(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), state)
            mel = getattr(new, "mel", None) if cfg.audio else None
            if mel is not None:  # the audiovisual exits too (silence), so their first frame is not slow
                quiet = np.full((1, mel.n_mels, mel.frames), math.log(LOG_FLOOR), dtype=np.float32)
                for _ in range(cfg.warmup_runs):
                    new.infer(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), state, quiet)
        except BaseException:
            new.close()
            raise
        self._paths[id(new)] = os.path.realpath(path)
        log.info("loaded %s from %s", new.bundle_id, path)
        return new

    def moved(self, path: str) -> bool:
        """True when ``path`` no longer resolves to where the serving engine came from."""
        return os.path.realpath(path) != self._paths.get(id(self.engine))

    def swap(self, new: Engine) -> dict[str, Any]:
        """Serve ``new``; the serving engine becomes the previous one, and the previous one is closed."""
        retired, self.previous, self.engine = self.previous, self.engine, new
        self.state = new.new_state()  # policy history belongs to the old classes/contexts
        self.max_version = max(self.max_version, _version(new))
        if retired is not None and retired is not new:
            self._paths.pop(id(retired), None)
            retired.close()
        return self._changed("now serving")

    def rollback(self) -> dict[str, Any]:
        if self.engine is None or self.previous is None:
            raise PolymorphError("rollback: no previous bundle (nothing was loaded since start)")
        self.engine, self.previous = self.previous, self.engine
        self.state = self.engine.new_state()
        return self._changed("rolled back to")

    def set_knobs(self, **knobs: Any) -> dict[str, Any]:
        """Set knobs on the serving engine and keep them for the engines loaded later."""
        if self.engine is None:
            raise PolymorphError("set: no engine is loaded yet")
        result = self.engine.set_knobs(**knobs)
        self.overrides.update(knobs)
        return result

    def close(self) -> None:
        for engine in (self.previous, self.engine):
            if engine is not None:
                engine.close()

    def _check_version(self, new: Engine, path: str) -> None:
        version = _version(new)
        if version < self.max_version:
            raise BundleError(
                f"{Path(path) / 'manifest.json'}: {new.bundle_id}: version {version} is older than version "
                f"{self.max_version} already served: an older signed bundle is refused as an update (rollback "
                f"protection); use 'ctl rollback' to go back on purpose, or re-export it with --version "
                f"{self.max_version + 1} or above and sign it"
            )

    def _changed(self, what: str) -> dict[str, Any]:
        assert self.engine is not None
        previous = self.previous.bundle_id if self.previous is not None else None
        if previous is not None:
            log.info("%s %s (previous %s)", what, self.engine.bundle_id, previous)
        return {"bundle": self.engine.bundle_id, "previous": previous}


def _version(engine: Engine) -> int:
    """The version in ``engine.bundle_id`` = "<bundle_id>@<version>"."""
    version = engine.bundle_id.rpartition("@")[2]
    return int(version) if version.isdigit() else 0
