"""Config: file + flag precedence, errors that name the field, endpoint and source forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from polymorphd.daemon.config import (
    DaemonConfig,
    client_address,
    load_config,
    parse_endpoint,
    parse_synthetic,
    source_kind,
)
from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.modes import MODES, Mode


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    return d


def write(tmp_path: Path, data: dict, name: str = "polymorphd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return p


def test_defaults_and_every_field_is_described(bundle):
    cfg = load_config(None, {"bundle": str(bundle)})
    assert cfg.camera == "cam0" and cfg.drop_policy == "drop-oldest" and cfg.payload_format == "json"
    assert cfg.providers == ["CPUExecutionProvider"] and cfg.heartbeat_s <= 2 and cfg.source == "synthetic:"
    for name, f in DaemonConfig.model_fields.items():
        assert f.description, name


def test_yaml_file_with_flag_overrides_and_relative_paths(tmp_path, bundle):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "server.key_secret").write_text("x")
    p = write(
        tmp_path,
        {
            "bundle": "bundle",
            "camera": "gate",
            "mode": "early-exit",
            "source_fps": 5,
            "reconnect": {"initial_s": 1, "max_s": 4},
            "curve": {"server_secret_file": "keys/server.key_secret"},
            "policy": {"max_adapters": 1},
        },
    )
    cfg = load_config(p, {"camera": "yard", "mode": None, "source_fps": 10.0})
    assert cfg.camera == "yard" and cfg.mode == "early-exit" and cfg.source_fps == 10.0
    assert cfg.bundle == str(bundle) and cfg.curve.server_secret_file == str(
        tmp_path / "keys/server.key_secret"
    )
    assert cfg.reconnect.max_s == 4 and cfg.policy == {"max_adapters": 1}
    with pytest.raises(Exception, match="frozen"):
        cfg.camera = "other"


def test_policy_holds_only_the_knobs_given_checked_and_normalised(tmp_path, bundle):
    p = write(tmp_path, {"bundle": str(bundle), "policy": {"max_adapters": "3", "exit1_hi": "0.8"}})
    assert load_config(p).policy == {"max_adapters": 3, "exit1_hi": 0.8}  # the bundle's manifest has the rest
    assert load_config(None, {"bundle": str(bundle)}).policy == {}


def test_one_mode_list():
    from polymorphd.daemon import cli, engine, modes

    assert DaemonConfig.model_fields["mode"].annotation == Mode and engine.MODES is MODES
    assert set(modes.CONTEXT_MODES) < set(MODES)
    parser = cli.build_parser()
    for mode in MODES:  # the CLI offers exactly these
        assert parser.parse_args(["serve", "--mode", mode]).mode == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--mode", "turbo"])


def test_json_file(tmp_path, bundle):
    cfg = load_config(write(tmp_path, {"bundle": str(bundle), "payload_format": "msgpack"}, "c.json"))
    assert cfg.payload_format == "msgpack"


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"camrea": "x"}, "camrea", "unknown field; known fields: audio, audio_fps, bundle, bundle_store"),
        ({"reconnect": {"initial_s": 5, "max_s": 1}}, "reconnect", "max_s (1.0) must be >= initial_s (5.0)"),
        ({"reconnect": {"initial_s": 0}}, "reconnect.initial_s", "greater than 0"),
        ({"heartbeat_s": 3}, "heartbeat_s", "less than or equal to 2"),
        ({"drop_policy": "newest"}, "drop_policy", "'drop-oldest' or 'block'"),
        ({"mode": "turbo"}, "mode", "'polymorph'"),
        ({"pub": "tcp://*:5555", "ctl": "tcp://*:5555"}, "<top level>", "pub and ctl are the same endpoint"),
        ({"ctl": "connect:tcp://h:1"}, "<top level>", "must bind"),
        ({"pub": "localhost:5555"}, "pub", "not a ZeroMQ address"),
        ({"source": "synthetic:?sed=3"}, "source", "unknown synthetic: argument(s) ['sed']"),
        ({"source": "synthetic:?seed=x"}, "source", "seed='x' must be an integer"),
        ({"loop": True}, "<top level>", "loop: true only applies to video files"),
        ({"camera": "a/b"}, "camera", "pattern"),
        ({"providers": []}, "providers", "at least 1"),
        ({"policy": {"max_adapters": 0}}, "policy", "knob max_adapters must be an integer >= 1, got 0"),
        ({"policy": {"recall_threshold": True}}, "policy", "knob recall_threshold: expected a number"),
        ({"policy": {"warp": 1}}, "policy", "unknown knob 'warp'; valid knobs are mode, max_adapters"),
        ({"policy": {"exit_thresholds": [[0.9, 0.1]]}}, "policy", "exit 0 thresholds lo=0.9, hi=0.1 invalid"),
    ],
)
def test_errors_name_the_field(tmp_path, bundle, data, field, words):
    p = write(tmp_path, {"bundle": str(bundle), **data})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert msg.startswith(f"config {p}: {field}: "), msg
    assert words in msg


def test_missing_things_are_reported_at_load(tmp_path, bundle):
    with pytest.raises(ConfigError, match=r"config <command line>: bundle: required; .* --bundle"):
        load_config(None, {})
    with pytest.raises(ConfigError, match=r"bundle: .*nope does not exist"):
        load_config(None, {"bundle": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"source: .*missing.mp4' is neither an existing video file"):
        load_config(None, {"bundle": str(bundle), "source": str(tmp_path / "missing.mp4")})
    with pytest.raises(ConfigError, match=r"pubkey: .*k.pem does not exist"):
        load_config(None, {"bundle": str(bundle), "pubkey": str(tmp_path / "k.pem")})
    assert load_config(None, {}, require_bundle=False).bundle is None


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("camera: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config {bad}: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of fields at the top level, got list"):
        load_config(lst)


def test_endpoint_forms():
    assert parse_endpoint("tcp://*:5555") == ("bind", "tcp://*:5555")
    assert parse_endpoint("connect:tcp://proxy:6000") == ("connect", "tcp://proxy:6000")
    assert parse_endpoint("bind:ipc:///run/p.sock", "connect") == ("bind", "ipc:///run/p.sock")
    with pytest.raises(ValueError, match="optionally prefixed with bind: or connect:"):
        parse_endpoint("udp://x:1")
    assert client_address("tcp://*:5555") == "tcp://127.0.0.1:5555"
    assert client_address("tcp://0.0.0.0:5") == "tcp://127.0.0.1:5"
    assert client_address("connect:tcp://h:1") == "tcp://h:1"


def test_source_kinds_and_synthetic_args():
    assert [
        source_kind(u)
        for u in (
            "0",
            "/dev/video2",
            "rtsp://cam/1",
            "https://x/y.m3u8",
            "gst:v ! appsink",
            "synthetic:",
            "clip.mp4",
        )
    ] == ["v4l2", "v4l2", "stream", "stream", "gst", "synthetic", "file"]
    assert parse_synthetic("synthetic:") == {}
    assert parse_synthetic("synthetic:?seed=3&classes=32") == {"seed": "3", "classes": "32"}


def test_errors_from_flags_say_command_line(tmp_path, bundle):
    p = write(tmp_path, {"bundle": str(bundle)})
    with pytest.raises(ConfigError, match=r"^config <command line>: source_fps: "):
        load_config(p, {"source_fps": -1.0})
    with pytest.raises(ConfigError, match=r"^config <command line>: bundle: .*nope does not exist"):
        load_config(p, {"bundle": str(tmp_path / "nope")})
