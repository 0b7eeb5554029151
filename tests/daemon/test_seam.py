"""The engine seam: the real Engine and the test doubles conform to the Protocols the daemon is typed with.

isinstance (runtime_checkable) says every member exists; the signature check says every method takes the
parameters the Protocol names, of the same kind, so a renamed or added required parameter fails here and
not, silently, only in the fakes. Annotations are not compared: the Protocol's may be wider (``Any``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from polymorphd.daemon import app, seam
from polymorphd.daemon.engine import Engine, FrameResult, load_engine
from polymorphd.models.core.errors import PolymorphError
from tests.daemon import fakes

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def _params(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    return params[1:] if params and params[0].name == "self" else params


def signature_problems(proto: Callable[..., Any], impl: Callable[..., Any]) -> list[str]:
    """Why a call written against ``proto``'s signature could fail on ``impl`` (empty when it cannot)."""
    want, have = _params(proto), _params(impl)
    problems: list[str] = []
    by_name = {p.name: p for p in have}
    var_pos = any(p.kind is P.VAR_POSITIONAL for p in have)
    var_kw = any(p.kind is P.VAR_KEYWORD for p in have)
    want_pos = [p for p in want if p.kind in POSITIONAL]
    have_pos = [p for p in have if p.kind in POSITIONAL]
    keyword_names = {p.name for p in want if p.kind is P.KEYWORD_ONLY}
    for i, w in enumerate(want_pos):
        if i >= len(have_pos):
            if not var_pos:
                problems.append(f"missing positional parameter {w.name!r}")
            continue
        h = have_pos[i]
        if h.name != w.name:
            problems.append(f"positional parameter {i} is {h.name!r}; the protocol calls it {w.name!r}")
        elif w.kind is P.POSITIONAL_OR_KEYWORD and h.kind is P.POSITIONAL_ONLY:
            problems.append(f"{h.name!r} is positional-only; the protocol passes it by keyword too")
        if w.default is not P.empty and h.default is P.empty:
            problems.append(f"{h.name!r} has no default; the protocol's has one")
    for h in have_pos[len(want_pos) :]:
        if h.default is P.empty and h.name not in keyword_names:
            problems.append(f"extra required parameter {h.name!r}")
    for w in want:
        if w.kind is not P.KEYWORD_ONLY:
            continue
        h = by_name.get(w.name)
        if h is None or h.kind not in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD):
            if not var_kw:
                problems.append(f"missing keyword parameter {w.name!r}")
        elif w.default is not P.empty and h.default is P.empty:
            problems.append(f"{h.name!r} has no default; the protocol's has one")
    for h in have:
        if h.kind is P.KEYWORD_ONLY and h.default is P.empty and h.name not in keyword_names:
            problems.append(f"extra required keyword parameter {h.name!r}")
    for kind, star in ((P.VAR_POSITIONAL, var_pos), (P.VAR_KEYWORD, var_kw)):
        if any(p.kind is kind for p in want) and not star:
            problems.append(f"no {kind.description} parameter; the protocol passes one")
    return problems


def _methods(proto: type) -> list[str]:
    return sorted(n for n, v in vars(proto).items() if inspect.isfunction(v) and not n.startswith("_"))


def conformance_problems(proto: type, cls: type) -> dict[str, list[str]]:
    """Per protocol method: missing, or what is wrong with its signature on ``cls``."""
    out: dict[str, list[str]] = {}
    for name in _methods(proto):
        impl = getattr(cls, name, None)
        problems = ["missing"] if not callable(impl) else signature_problems(getattr(proto, name), impl)
        if problems:
            out[name] = problems
    return out


def test_the_protocol_names_what_the_daemon_calls():
    assert _methods(seam.Engine) == [
        "close",
        "infer",
        "knobs",
        "new_state",
        "set_knobs",
        "with_adapter_bundle",
    ]
    assert set(seam.Engine.__annotations__) == {"bundle_id", "classes"}


@pytest.mark.parametrize("cls", [Engine, fakes.FakeEngine], ids=["Engine", "FakeEngine"])
def test_engine_methods_match_the_protocol(cls):
    assert conformance_problems(seam.Engine, cls) == {}


def test_fake_engine_is_an_engine():
    engine = fakes.FakeEngine()
    assert isinstance(engine, seam.Engine)
    result = engine.infer(np.zeros((4, 4, 3), np.uint8), engine.new_state())
    assert isinstance(result, seam.Inference)


def test_real_engine_is_an_engine(tiny_bundle):
    engine = load_engine(tiny_bundle)
    try:
        assert isinstance(engine, seam.Engine)
        assert isinstance(engine.infer(np.zeros((8, 8, 3), np.uint8), engine.new_state()), seam.Inference)
    finally:
        engine.close()


@pytest.mark.parametrize("cls", [FrameResult, fakes.FrameResult], ids=["engine", "fakes"])
def test_frame_results_are_inferences(cls):
    r = cls(np.zeros(3, np.float32), [0], "final", [1], 0.1, 0.2, 1, 2)
    assert isinstance(r, seam.Inference)


@pytest.mark.parametrize(
    "factory",
    [load_engine, app._default_factory, fakes.FakeBackend().load],
    ids=["load_engine", "default", "fake"],
)
def test_factories_match_the_protocol(factory):
    assert signature_problems(seam.EngineFactory.__call__, factory) == []


def test_drift_is_caught():
    class Renamed(fakes.FakeEngine):
        def infer(self, frame: np.ndarray, state: Any, mel: Any = None) -> Any:  # was frame_bgr
            return super().infer(frame, state, mel)

    class NewRequired(fakes.FakeEngine):
        def with_adapter_bundle(self, path: Any, pubkey: Any = None, *, verify: bool) -> Any:
            raise NotImplementedError

    class Missing:
        bundle_id, classes = "x@1", ["a"]

        def new_state(self) -> Any:
            return None

    assert conformance_problems(seam.Engine, Renamed) == {
        "infer": ["positional parameter 0 is 'frame'; the protocol calls it 'frame_bgr'"]
    }
    assert conformance_problems(seam.Engine, NewRequired) == {
        "with_adapter_bundle": ["extra required keyword parameter 'verify'"]
    }
    assert set(conformance_problems(seam.Engine, Missing)) == {
        "close",
        "infer",
        "knobs",
        "set_knobs",
        "with_adapter_bundle",
    }
    assert not isinstance(Missing(), seam.Engine)

    def bad_factory(path: str, *, mode: str, threads: int, pubkey: str | None) -> Any:
        raise NotImplementedError

    assert signature_problems(seam.EngineFactory.__call__, bad_factory) == [
        "missing keyword parameter 'providers'"
    ]


def test_slot_swaps_rolls_back_and_keeps_runtime_knobs(tmp_path):
    backend = fakes.FakeBackend()
    slot = seam.EngineSlot(backend.load, backend.is_adapter)
    cfg = fakes.config(tmp_path, fakes.make_bundle(tmp_path, "alpha", 1))
    with pytest.raises(PolymorphError, match="no previous bundle"):
        slot.rollback()
    assert slot.swap(slot.prepare(cfg.bundle, cfg)) == {"bundle": "alpha@1", "previous": None}
    first = slot.engine
    slot.set_knobs(max_adapters=3)
    beta = str(fakes.make_bundle(tmp_path, "beta", 2))
    assert slot.moved(beta) and not slot.moved(cfg.bundle)
    assert slot.swap(slot.prepare(beta, cfg)) == {"bundle": "beta@2", "previous": "alpha@1"}
    assert slot.engine.knobs()["max_adapters"] == 3  # the runtime knob outlived the swap
    assert slot.rollback() == {"bundle": "alpha@1", "previous": "beta@2"}
    assert slot.engine is first and not first.closed
    slot.swap(slot.prepare(str(fakes.make_bundle(tmp_path, "gamma", 3)), cfg))
    assert [e.closed for e in backend.engines] == [False, True, False]  # beta retired, alpha previous
    slot.close()
    assert all(e.closed for e in backend.engines)
