"""Runtime knobs: one model for names, defaults, value forms and errors that name the knob."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from pydantic import ValidationError

from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.knobs import (
    EngineKnobs,
    ExitThreshold,
    PolicyKnobs,
    check_settings,
    manifest_policy,
    parse_knobs,
    validate,
)
from polymorphd.models.core.modes import MODES, Mode

TWO_EXITS = EngineKnobs(exit_thresholds=([0.1, 0.9], {"lo": 0.2, "hi": 0.8}))


def test_policy_defaults_keep_the_manifest_shape():
    # training writes exactly this into calibration.json, export copies it into the manifest's policy; knobs
    # newer than v1 (support) only when set, so daemons that predate them keep loading new bundles
    assert manifest_policy(PolicyKnobs(support=0.05))["support"] == 0.05
    assert PolicyKnobs().support == 0.0
    assert manifest_policy() == {
        "max_adapters": 2,
        "recall_threshold": 0.2,
        "keep_frames": 2,
        "refresh_every": 30,
        "surprise_jaccard": 0.3,
    }


@pytest.mark.parametrize("model", [PolicyKnobs, ExitThreshold, EngineKnobs])
def test_every_field_is_described_and_extra_keys_are_refused(model):
    for name, f in model.model_fields.items():
        assert f.description, name
    assert model.model_config["extra"] == "forbid" and model.model_config["frozen"]


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValidationError, match="budget"):
        PolicyKnobs(budget=1)  # type: ignore[call-arg]
    with pytest.raises(
        ConfigError, match=r"unknown knob 'budget'; valid knobs are max_adapters, recall_threshold"
    ):
        validate(PolicyKnobs, {"budget": 1})
    with pytest.raises(
        ConfigError, match=r"unknown knob 'nope'; valid knobs are mode, .*exit1_lo, exit1_hi$"
    ):
        TWO_EXITS.update({"nope": 1})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_adapters": 0}, r"^knob max_adapters must be an integer >= 1, got 0: adapters run per frame"),
        (
            {"max_adapters": 1.5},
            r"^knob max_adapters: expected an integer, got 1.5; it must be an integer >= 1: ",
        ),
        (
            {"max_adapters": "lots"},
            r"^knob max_adapters: expected a number, got 'lots'; it must be an integer >= 1: ",
        ),
        (
            {"keep_frames": "two"},
            r"^knob keep_frames: expected a number, got 'two'; it must be an integer >= 0: ",
        ),
        (
            {"recall_threshold": True},
            r"^knob recall_threshold: expected a number, got True; it must be a number in \(0, 1\): ",
        ),
        ({"recall_threshold": "nan"}, r"^knob recall_threshold must be a number in \(0, 1\), got 'nan': "),
        ({"surprise_jaccard": 1.5}, r"^knob surprise_jaccard must be a number in \[0, 1\], got 1.5: "),
        (
            {"mode": "fast"},
            r"^mode 'fast' invalid: choose one of full, early-exit, polymorph, switching, merged$",
        ),
        ({"exit1_lo": -0.1}, r"^exit 1 thresholds lo=-0.1, hi=0.8 invalid: need 0 <= lo <= hi <= 1 "),
        (
            {"exit0_hi": "x"},
            r"^knob exit0_hi: expected a number, got 'x'; a class scored above hi is decided",
        ),
        (
            {"exit0_lo": 2},
            r"^exit 0 thresholds lo=2, hi=0.9 invalid: need 0 <= lo <= hi <= 1 \(lo=0, hi=1 disables",
        ),
        ({"exit0_lo": 0.95}, r"^exit 0 thresholds lo=0.95, hi=0.9 invalid: need 0 <= lo <= hi <= 1 "),
        ({"exit2_lo": 0.1}, r"^knob exit2_lo: the bundle has 2 exit\(s\), numbered 0..1$"),
        ({"exit_thresholds": [[0, 1]]}, r"^knob exit_thresholds: expected a list of 2 \[lo, hi\] pairs"),
        (
            {"exit_thresholds": 0.5},
            r"^knob exit_thresholds: expected a list of \[lo, hi\] pairs, one per exit, got 0.5; the exits'",
        ),
        ({"exit_thresholds": [[0, 1], [0.5]]}, r"^knob exit_thresholds\[1\]: expected \[lo, hi\] or"),
        (
            {"exit_thresholds": [[0, 1], {"lo": 0, "high": 1}]},
            r"^knob exit_thresholds\[1\]: expected \[lo, hi\]",
        ),
    ],
)
def test_errors_name_the_knob_what_it_must_be_and_the_value(changes, message):
    with pytest.raises(ConfigError, match=message):
        TWO_EXITS.update(changes)


def test_value_forms_from_json_yaml_and_text():
    got = TWO_EXITS.update(
        {"max_adapters": "3", "refresh_every": 5.0, "recall_threshold": "0.25", "exit1_hi": "0.85"}
    ).flat()
    assert (got["max_adapters"], got["refresh_every"], got["recall_threshold"], got["exit1_hi"]) == (
        3,
        5,
        0.25,
        0.85,
    )
    got = TWO_EXITS.update({"exit_thresholds": [{"lo": 0.3, "hi": 0.6}, ["0", "1"]]}).flat()
    assert got["exit_thresholds"] == [[0.3, 0.6], [0.0, 1.0]]
    assert (got["exit0_lo"], got["exit0_hi"], got["exit1_lo"], got["exit1_hi"]) == (0.3, 0.6, 0.0, 1.0)


def test_update_is_a_validated_copy_and_one_side_applies_over_the_list():
    new = TWO_EXITS.update({"exit_thresholds": [[0, 1], [0, 1]], "exit0_hi": 0.5, "mode": "full"})
    assert new.flat()["exit_thresholds"] == [[0.0, 0.5], [0.0, 1.0]] and new.mode == "full"
    assert TWO_EXITS.flat()["exit_thresholds"] == [[0.1, 0.9], [0.2, 0.8]] and TWO_EXITS.mode == "polymorph"
    assert new.policy() == PolicyKnobs() and TWO_EXITS.update({}) == TWO_EXITS
    assert TWO_EXITS.update({"max_adapters": 1}).policy() == PolicyKnobs(max_adapters=1)


def test_settings_without_a_bundle_keep_only_the_knobs_given():
    assert check_settings({}) == {}
    assert check_settings({"max_adapters": "1", "mode": "full"}) == {"max_adapters": 1, "mode": "full"}
    assert check_settings({"exit3_hi": "0.7"}) == {"exit3_hi": 0.7}  # exit numbers: checked at apply
    assert check_settings({"exit_thresholds": [[0, 1]] * 3}) == {"exit_thresholds": [[0.0, 1.0]] * 3}
    with pytest.raises(ConfigError, match="unknown knob 'warp'"):
        check_settings({"warp": 9})
    with pytest.raises(ConfigError, match="knob keep_frames must be an integer >= 0, got -1"):
        check_settings({"keep_frames": -1})


def test_parse_knobs_takes_json_values_else_text():
    assert parse_knobs(["a=1", "b=[0.1,0.2]", "mode=full", "c=", "d=x=y"], "ctl set") == {
        "a": 1,
        "b": [0.1, 0.2],
        "mode": "full",
        "c": "",
        "d": "x=y",
    }
    for bad in ("oops", "=1"):
        with pytest.raises(ConfigError, match=rf"^--set: '{bad}' is not KEY=VALUE$"):
            parse_knobs([bad], "--set")


def test_one_mode_list_cheap_to_import():
    assert MODES == get_args(Mode) == ("full", "early-exit", "polymorph", "switching", "merged")
    assert EngineKnobs.model_fields["mode"].annotation == Mode
    # the CLI reads it for --mode: the module must not pull in pydantic (or anything else)
    code = "import sys, polymorphd.models.core.modes; assert 'pydantic' not in sys.modules, 'pydantic'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_policy_carries_the_class_recall_block_beside_the_v1_knobs():
    from polymorphd.models.core.knobs import ClassRecall

    block = ClassRecall(
        version=1, target=0.9, exit_after_block=4, min_positives=20, pooled=0.1, thresholds=[0.1, 0.4]
    )
    policy = manifest_policy(class_recall=block)
    assert policy["class_recall"] == {
        "version": 1, "target": 0.9, "exit_after_block": 4, "min_positives": 20, "pooled": 0.1,
        "thresholds": [0.1, 0.4],
    }  # fmt: skip
    assert {k: v for k, v in policy.items() if k != "class_recall"} == manifest_policy()
    # the knobs model never takes it (daemons filter policy keys by the knobs they know)
    with pytest.raises(ConfigError, match="unknown knob 'class_recall'"):
        validate(PolicyKnobs, policy)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ClassRecall(**(block.model_dump() | {"thresholds": [0.1, 1.2]}))
