"""Runtime knobs: names, types, defaults, bounds and validation, in one place. Torch-free.

Training writes ``PolicyKnobs()``'s defaults into the run (calibration.json) and export copies them into the
manifest's ``policy``; the engine starts from the manifest's values and ``Engine.set_knobs`` changes them by
their flat names, which are also those of the daemon's ``set`` request, its config's ``policy:`` and
``eval``/``bench --set``. Values arrive from JSON, YAML or ``KEY=VALUE`` text, so numbers may be numeric
strings; a boolean is never a number. Every problem is a ConfigError that names the knob, says what it must
be and shows the value given.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar, get_args

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.modes import Mode

__all__ = [
    "CLASS_RECALL_KEY",
    "CLASS_RECALL_VERSION",
    "ClassRecall",
    "EngineKnobs",
    "ExitThreshold",
    "KnobSettings",
    "PolicyKnobs",
    "check_settings",
    "parse_knobs",
    "validate",
]

_EXIT_KNOB = re.compile(r"^exit(\d+)_(lo|hi)$")
# pydantic error types that mean "not a value of the knob's type" (the rest mean "out of range")
_TYPE_ERRORS = {
    "not_a_number",
    "int_type",
    "int_parsing",
    "int_from_float",
    "float_type",
    "float_parsing",
    "finite_number",
    "tuple_type",
}
K = TypeVar("K", bound=BaseModel)


def _not_bool(value: Any) -> Any:
    # pydantic would take True/False as 1/0; a knob number never comes from a boolean
    if isinstance(value, bool):
        raise PydanticCustomError("not_a_number", "expected a number, got a boolean")
    return value


Count = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]


class _Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyKnobs(_Knobs):
    """The context policy's knobs (``daemon/policy.py``); these defaults are the ones training writes."""

    max_adapters: Count = Field(
        2, ge=1, description="adapters run per frame, the LoRA tail's batch, so it bounds latency"
    )
    recall_threshold: Number = Field(
        0.2,
        gt=0,
        lt=1,
        description="an exit score above this makes a class likely; low on purpose, since a missed context "
        "costs accuracy and an extra one only time. A bundle with per-class recall thresholds (manifest "
        "policy.class_recall) uses those instead",
    )
    keep_frames: Count = Field(
        2, ge=0, description="a label published in the last N frames stays likely (temporal continuity)"
    )
    refresh_every: Count = Field(
        30, ge=0, description="every N frames widen to classes above recall_threshold / 2; 0 = never"
    )
    surprise_jaccard: Number = Field(
        0.3,
        ge=0,
        le=1,
        description="widen when Jaccard(exit's likely set, last labels) is below this (a scene change); 0 = never",
    )
    support: Number = Field(
        0.0,
        ge=0,
        lt=1,
        description="a recent label stays likely only while the exit still scores it above this (on the "
        "exit's calibrated scale); 0 keeps every recent label (the v1 policy). Not written into manifests "
        "at its default, so daemons that predate it keep reading new bundles",
    )


# Knobs added after the manifest's v1 policy: written into a manifest only when set, since daemons that
# predate them refuse unknown keys (PolicyKnobs forbids extras)
NEWER_POLICY_KNOBS = frozenset({"support"})


# The manifest policy's optional per-class recall block (docs/bundle.md "policy.class_recall"). Its version is
# its own: a daemon uses a block of a version it knows and keeps the single recall_threshold otherwise.
CLASS_RECALL_KEY = "class_recall"
CLASS_RECALL_VERSION = 1


def _unit(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"thresholds must lie in [0, 1], got {value}")
    return value


class ClassRecall(_Knobs):
    """Per-class recall thresholds on the selecting (last) exit's scores, fit at calibration
    (``calibrate.recall_thresholds``): the policy calls a class likely when the exit scores it above its own
    threshold instead of above the single ``recall_threshold``."""

    version: int = Field(description="the block's format; this polymorphd reads version 1")
    target: float = Field(gt=0, le=1, description="the recall each class keeps on the calibration split")
    exit_after_block: int = Field(ge=0, description="the exit whose scores the thresholds apply to")
    min_positives: int = Field(ge=1, description="fewer calibration positives: the pooled cut instead")
    pooled: Annotated[float, AfterValidator(_unit)] = Field(description="the fallback threshold")
    thresholds: list[Annotated[float, AfterValidator(_unit)]] = Field(description="one per class")


def manifest_policy(
    knobs: PolicyKnobs | None = None, class_recall: ClassRecall | None = None
) -> dict[str, Any]:
    """The policy dict training writes into calibration.json (and export into the manifest), with the
    per-class recall block when calibration fit one. Daemons ignore policy keys they do not know
    (``Engine``), so a bundle with the block still loads in one that predates it."""
    knobs = knobs or PolicyKnobs()
    default = PolicyKnobs()
    skip = {k for k in NEWER_POLICY_KNOBS if getattr(knobs, k) == getattr(default, k)}
    out = knobs.model_dump(exclude=skip)
    if class_recall is not None:
        out[CLASS_RECALL_KEY] = class_recall.model_dump()
    return out


class ExitThreshold(_Knobs):
    """One exit's thresholds (DESIGN.md "Early-exit policy"): the exit answers a frame when every class's
    probability is below ``lo`` or above ``hi``. Given as ``{"lo": .., "hi": ..}`` or ``[lo, hi]``."""

    # bounds checked with the order below, so that one message shows the whole pair
    lo: Number = Field(description="a class scored below lo is decided absent at this exit")
    hi: Number = Field(description="a class scored above hi is decided present; lo=0, hi=1 disables the exit")

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) == 2:
            return {"lo": value[0], "hi": value[1]}
        if isinstance(value, ExitThreshold) or (isinstance(value, dict) and set(value) == {"lo", "hi"}):
            return value
        raise PydanticCustomError("exit_pair", "expected [lo, hi]")

    @model_validator(mode="after")
    def _order(self) -> ExitThreshold:
        if not 0.0 <= self.lo <= self.hi <= 1.0:
            raise ValueError(
                f"thresholds lo={self.lo:g}, hi={self.hi:g} invalid: need 0 <= lo <= hi <= 1 "
                "(lo=0, hi=1 disables the exit)"
            )
        return self


class EngineKnobs(PolicyKnobs):
    """Every knob of a loaded engine: the policy's, ``mode`` and the exits' thresholds. ``set`` names them
    flat: ``exit_thresholds`` (one pair per exit) or one side of one exit as ``exit<i>_lo`` / ``exit<i>_hi``."""

    mode: Mode = Field("polymorph", description="execution mode (DESIGN.md, modes); polymorph is the method")
    exit_thresholds: tuple[ExitThreshold, ...] = Field((), description="the exits' thresholds, in exit order")

    def policy(self) -> PolicyKnobs:
        return PolicyKnobs(**{name: getattr(self, name) for name in PolicyKnobs.model_fields})

    def names(self) -> list[str]:
        """The knob names this engine accepts."""
        n = len(self.exit_thresholds)
        fields = ["mode", *PolicyKnobs.model_fields, "exit_thresholds"]
        return fields + [f"exit{i}_{side}" for i in range(n) for side in ("lo", "hi")]

    def flat(self) -> dict[str, Any]:
        """Every knob by the names ``set`` takes (the exits both per side and as ``exit_thresholds``)."""
        out: dict[str, Any] = {"mode": self.mode, **self.policy().model_dump()}
        pairs = [[e.lo, e.hi] for e in self.exit_thresholds]
        for i, (lo, hi) in enumerate(pairs):
            out[f"exit{i}_lo"], out[f"exit{i}_hi"] = lo, hi
        out["exit_thresholds"] = pairs
        return out

    def update(self, changes: Mapping[str, Any]) -> EngineKnobs:
        """A copy with ``changes`` (flat names) applied, all validated before any is; ConfigError names the
        first bad knob. The number of exits is the bundle's: ``exit_thresholds`` must keep it."""
        n = len(self.exit_thresholds)
        data = self.model_dump()
        sides: dict[tuple[int, str], Any] = {}
        for name, value in changes.items():
            if (m := _EXIT_KNOB.match(name)) is not None:
                i = int(m.group(1))
                if i >= n:
                    numbered = f", numbered 0..{n - 1}" if n else ""
                    raise ConfigError(f"knob {name}: the bundle has {n} exit(s){numbered}")
                sides[i, m.group(2)] = value
            elif name in type(self).model_fields:
                data[name] = value
            else:
                raise ConfigError(f"unknown knob {name!r}; valid knobs are {', '.join(self.names())}")
        new = validate(EngineKnobs, data)
        if len(new.exit_thresholds) != n:
            raise ConfigError(
                f"knob exit_thresholds: expected a list of {n} [lo, hi] pairs (one per exit of the bundle), "
                f"got {changes['exit_thresholds']!r}"
            )
        if sides:  # one side of an exit applies over exit_thresholds given in the same call
            data = new.model_dump()
            for (i, side), value in sides.items():
                data["exit_thresholds"][i][side] = value
            new = validate(EngineKnobs, data)
        return new


def validate(model: type[K], data: Mapping[str, Any]) -> K:
    """``model`` from ``data``; the first problem as a ConfigError naming the knob."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_message(model, exc.errors()[0])) from exc


def check_settings(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Knob settings checked without a bundle (the daemon config's ``policy:``): names, types and ranges,
    values normalised. The exit numbers are checked against the bundle when the settings are applied."""
    given = changes.get("exit_thresholds")
    if isinstance(given, list | tuple):
        n = len(given)
    else:
        n = 1 + max((int(m.group(1)) for k in changes if (m := _EXIT_KNOB.match(k))), default=-1)
    base = EngineKnobs(exit_thresholds=(ExitThreshold(lo=0.0, hi=1.0),) * n)
    flat = base.update(changes).flat()
    return {name: flat[name] for name in changes}


def _settings(value: dict[str, Any]) -> dict[str, Any]:
    try:
        return check_settings(value)
    except ConfigError as exc:  # pydantic reports a ValueError at the field's location
        raise ValueError(str(exc)) from None


KnobSettings = Annotated[dict[str, Any], AfterValidator(_settings)]
"""Type of a config field holding knob settings by flat name; only the knobs given (the bundle has the rest)."""


def parse_knobs(words: list[str], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` words -> knobs; a VALUE that parses as JSON is taken as JSON (numbers, lists), else text.

    Names are not checked here: the engine that applies them knows its bundle's exits."""
    knobs: dict[str, Any] = {}
    for w in words:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: {w!r} is not KEY=VALUE")
        try:
            knobs[key] = json.loads(value)
        except json.JSONDecodeError:
            knobs[key] = value
    return knobs


def _message(model: type[BaseModel], err: Any) -> str:
    """One pydantic error as the knob's name, what it must be and the value given."""
    loc, kind, value = err["loc"], err["type"], err["input"]
    fields = model.model_fields
    if len(loc) >= 2 and loc[0] == "exit_thresholds":  # one exit's pair, or one side of it
        i = loc[1]
        if len(loc) == 2:
            if kind == "exit_pair":
                return (
                    f'knob exit_thresholds[{i}]: expected [lo, hi] or {{"lo": .., "hi": ..}}, got {value!r}'
                )
            return f"exit {i} {err['msg'].removeprefix('Value error, ')}"
        name, fields = f"exit{i}_{loc[2]}", ExitThreshold.model_fields
        info = fields[str(loc[2])]
    else:
        name = str(loc[0]) if loc else model.__name__
        info = fields.get(name)
    if kind == "extra_forbidden" or info is None:
        return f"unknown knob {name!r}; valid knobs are {', '.join(fields)}"
    if kind == "literal_error":
        return f"{name} {value!r} invalid: choose one of {', '.join(get_args(info.annotation))}"
    expected = _expected(info)
    if kind in _TYPE_ERRORS:
        what = _noun(info, value)
        must = f"it must be {expected}: " if what != expected else ""
        return f"knob {name}: expected {what}, got {value!r}; {must}{info.description}"
    return f"knob {name} must be {expected}, got {value!r}: {info.description}"


def _noun(info: FieldInfo, value: Any) -> str:
    """What the value is not: an integer when it is a number with a fraction, else a number (or a list)."""
    if info.annotation not in (int, float):
        return _expected(info)
    if info.annotation is int and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            if math.isfinite(float(value)):
                return "an integer"
    return "a number"


def _expected(info: FieldInfo) -> str:
    """'an integer >= 1', 'a number in (0, 1)', ... from the field's type and bounds."""
    bound = {type(m): m for m in info.metadata if isinstance(m, Ge | Gt | Le | Lt)}
    if info.annotation is int:
        return f"an integer >= {bound[Ge].ge}" if Ge in bound else "an integer"
    if info.annotation is float and not bound:
        return "a number"
    if info.annotation is float:
        lo = f"[{bound[Ge].ge}" if Ge in bound else f"({bound[Gt].gt}" if Gt in bound else "(-inf"
        hi = f"{bound[Le].le}]" if Le in bound else f"{bound[Lt].lt})" if Lt in bound else "inf)"
        return f"a number in {lo}, {hi}"
    return "a list of [lo, hi] pairs, one per exit"
