"""Daemon configuration: one immutable, validated object handed to the app.

Loaded from YAML or JSON, then overridden by command-line flags. Every error is
a ConfigError ``config <file>: <field.path>: <problem>`` so an operator knows
which line to fix. Relative paths in a file are resolved against the file's
directory (systemd units usually run from ``/``); paths from flags against the
working directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.knobs import KnobSettings
from polymorphd.models.core.modes import Mode

_ENDPOINT = re.compile(r"^(?:(bind|connect):)?((?:tcp|ipc|inproc)://.+)$")
# synthetic: query keys. seed is SynthConfig.seed (fixes the class groups, as `polymorphd data synth --seed`
# does), so a stream matches the dataset a bundle was trained on; stream_seed varies the videos.
_SYNTH_KEYS = {"seed", "stream_seed", "classes", "contexts", "width", "height", "background"}
# Fields that name files, resolved against the config file's directory.
_PATH_FIELDS = (
    ("bundle",),
    ("pubkey",),
    ("bundle_store",),
    ("curve", "server_secret_file"),
    ("curve", "clients_dir"),
)


def parse_endpoint(endpoint: str, default: Literal["bind", "connect"] = "bind") -> tuple[str, str]:
    """Split ``[bind:|connect:]tcp://...`` into (how, address); ValueError says the accepted forms."""
    m = _ENDPOINT.match(endpoint.strip())
    if not m:
        raise ValueError(
            f"endpoint {endpoint!r} is not a ZeroMQ address; expected tcp://HOST:PORT, ipc://PATH or "
            "inproc://NAME, optionally prefixed with bind: or connect:"
        )
    return (m.group(1) or default), m.group(2)


def parse_synthetic(uri: str) -> dict[str, str]:
    """Query arguments of a ``synthetic:[?k=v&...]`` URI; ValueError names an unknown key."""
    query = uri[len("synthetic:") :].lstrip("/").lstrip("?")
    args = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(args) - _SYNTH_KEYS)
    if unknown:
        raise ValueError(f"unknown synthetic: argument(s) {unknown}; known: {sorted(_SYNTH_KEYS)}")
    for key in ("seed", "stream_seed", "classes", "contexts", "width", "height"):
        if key in args and not args[key].lstrip("-").isdigit():
            raise ValueError(f"synthetic: argument {key}={args[key]!r} must be an integer")
    return args


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reconnect(_Model):
    initial_s: float = Field(0.5, gt=0, description="first wait before reopening a failed or ended source")
    # 1 s, not more: a camera that comes back is read again within max_s + its open time (the 2 s promise in
    # docs/RELIABILITY.md); one open attempt a second costs a dead camera nothing
    max_s: float = Field(
        1.0, gt=0, description="longest wait between reopen attempts (the wait doubles up to it)"
    )

    @model_validator(mode="after")
    def _order(self) -> Reconnect:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= initial_s ({self.initial_s}); raise max_s")
        return self


class Curve(_Model):
    server_secret_file: str = Field(
        description="server certificate with the secret key (zmq.auth.create_certificates' .key_secret file)"
    )
    clients_dir: str | None = Field(
        None, description="directory of authorised client public certificates; null accepts any client key"
    )


class DaemonConfig(_Model):
    camera: str = Field("cam0", pattern=r"^[A-Za-z0-9_.-]+$", description="camera name used in topics")
    source: str = Field(
        "synthetic:",
        description="/dev/videoN, N, a video file, rtsp:// or http(s):// URL, gst:PIPELINE or synthetic:",
    )
    source_fps: float = Field(
        0.0, ge=0, description="read at most this many frames per second (0 = unlimited)"
    )
    loop: bool = Field(False, description="restart a video file at its end instead of ending the source")
    audio: str | None = Field(
        None,
        pattern=r"^(wav:.+|alsa:.*)$",
        description="audio beside the camera (wav:PATH or alsa:DEVICE) for a bundle with audio exits; "
        "None: visual exits only, as without audio. A failing audio source falls back to the visual exits",
    )
    audio_fps: float = Field(
        10.0,
        gt=0,
        description="wav: sources: the video's frame rate; frame i's audio window ends at (i+1)/fps",
    )
    drop_policy: Literal["drop-oldest", "block"] = Field(
        "drop-oldest", description="when inference is slower than capture: replace the unread frame, or wait"
    )
    reconnect: Reconnect = Field(
        default_factory=Reconnect, description="backoff when the source fails or ends"
    )
    stall_s: float = Field(
        5.0,
        gt=0,
        description="a live source that gives no frame for this long is reported 'stalled'; network streams "
        "also get it as OpenCV's read timeout, so a hung stream is reopened",
    )
    bundle: str | None = Field(None, description="bundle directory to serve (required to serve)")
    bundle_store: str | None = Field(
        None,
        description="directory every 'ctl load' path must resolve inside, symlinks resolved (the installer's "
        "store, e.g. /var/lib/polymorphd/bundles); null accepts any path",
    )
    pubkey: str | None = Field(
        None, description="Ed25519 public key (PEM); bundles must carry a valid signature"
    )
    mode: Mode = Field("polymorph", description="inference mode")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime execution providers, in order of preference",
    )
    threads: int = Field(2, ge=1, le=256, description="ONNX Runtime intra-op threads")
    pub: str = Field(
        "tcp://*:5555", description="label stream endpoint (bind by default; connect:... for a proxy)"
    )
    ctl: str = Field("tcp://127.0.0.1:5556", description="control endpoint (REP, always bound)")
    payload_format: Literal["json", "msgpack"] = Field("json", description="label stream payload encoding")
    include_scores: bool = Field(False, description="add every class's score to each label message")
    heartbeat_s: float = Field(
        1.0, gt=0, le=2.0, description="status message period (the contract is <= 2 s)"
    )
    curve: Curve | None = Field(None, description="CURVE encryption/authentication for both sockets")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Prometheus endpoint port (null = off)"
    )
    metrics_addr: str = Field("127.0.0.1", description="address the Prometheus endpoint listens on")
    policy: KnobSettings = Field(
        default_factory=dict,
        description="engine knobs set at load, as for 'ctl set' (max_adapters, exit0_hi, ...); the bundle's "
        "manifest gives the others",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="daemon log level")
    warmup_runs: int = Field(2, ge=0, le=100, description="inference runs on a blank frame before READY=1")
    stop_timeout_s: float = Field(1.5, gt=0, description="grace period for threads when stopping")

    @field_validator("pub", "ctl")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parse_endpoint(v)
        return v.strip()

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("empty source; give /dev/videoN, a file, a URL, gst:PIPELINE or synthetic:")
        if v.startswith("synthetic:"):
            parse_synthetic(v)
        elif v.startswith("gst:") and not v[4:].strip():
            raise ValueError(
                "gst: needs a pipeline ending in appsink, e.g. gst:videotestsrc ! videoconvert ! appsink"
            )
        return v

    @model_validator(mode="after")
    def _cross(self) -> DaemonConfig:
        pub, ctl = parse_endpoint(self.pub)[1], parse_endpoint(self.ctl)[1]
        if pub == ctl and not ctl.endswith(":*"):  # two wildcard ports get two different ports
            raise ValueError(
                f"pub and ctl are the same endpoint {self.ctl!r}; give them different ports or paths"
            )
        if parse_endpoint(self.ctl)[0] == "connect":
            raise ValueError(f"ctl {self.ctl!r}: the control socket must bind; drop the connect: prefix")
        if self.loop and source_kind(self.source) != "file":
            raise ValueError(
                f"loop: true only applies to video files, but source is {self.source!r}; remove loop"
            )
        return self


def client_address(endpoint: str) -> str:
    """Where a client connects for a daemon endpoint: bind wildcards become the loopback address."""
    _, addr = parse_endpoint(endpoint)
    return re.sub(r"^tcp://(\*|0\.0\.0\.0):", "tcp://127.0.0.1:", addr)


def source_kind(uri: str) -> str:
    """synthetic | gst | v4l2 | stream | file, from the URI's form."""
    if uri.startswith("synthetic:"):
        return "synthetic"
    if uri.startswith("gst:"):
        return "gst"
    if uri.isdigit() or uri.startswith("/dev/video"):
        return "v4l2"
    if re.match(r"^(rtsp|rtsps|http|https|rtmp|udp)://", uri):
        return "stream"
    return "file"


def _check_files(cfg: DaemonConfig) -> list[tuple[str, str]]:
    """Paths that must exist, checked at load rather than at first use."""
    problems = []
    for name, path, want_dir in (
        ("bundle", cfg.bundle, True),
        ("pubkey", cfg.pubkey, False),
        ("bundle_store", cfg.bundle_store, True),
        ("curve.server_secret_file", cfg.curve and cfg.curve.server_secret_file, False),
        ("curve.clients_dir", cfg.curve and cfg.curve.clients_dir, True),
    ):
        if path and not Path(path).exists():
            problems.append((name, f"{path} does not exist; fix the path"))
        elif path and want_dir and not Path(path).is_dir():
            problems.append((name, f"{path} is not a directory"))
    if source_kind(cfg.source) == "file" and not Path(cfg.source).is_file():
        problems.append(
            ("source", f"{cfg.source!r} is neither an existing video file nor a known URI scheme")
        )
    return problems


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for keys in _PATH_FIELDS:
        parent = data
        for k in keys[:-1]:
            parent = parent.get(k) if isinstance(parent.get(k), dict) else None
            if parent is None:
                break
        if parent is not None and isinstance(parent.get(keys[-1]), str):
            p = Path(parent[keys[-1]]).expanduser()
            parent[keys[-1]] = str(p if p.is_absolute() else base / p)
    src = data.get("source")
    if isinstance(src, str) and source_kind(src) == "file" and not Path(src).is_absolute():
        data["source"] = str(base / src)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping (paths resolved against its directory)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {path}: expected a mapping of fields at the top level, got {type(data).__name__}"
        )
    _resolve_paths(data, path.resolve().parent)
    return data


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *, require_bundle: bool = True
) -> DaemonConfig:
    """File fields, then non-None overrides (CLI flags); raises ConfigError naming the field."""
    where = str(path) if path is not None else "<command line>"
    data = read_config_file(path) if path is not None else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    data.update(flags)
    try:
        cfg = DaemonConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top level>"
        if first["loc"] and first["loc"][0] in flags:
            where = "<command line>"  # the flag, not the file, holds the bad value
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = f"unknown field; known fields: {', '.join(sorted(DaemonConfig.model_fields))}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"config {where}: {loc}: {msg}{more}") from exc
    if require_bundle and not cfg.bundle:
        raise ConfigError(f"config {where}: bundle: required; set bundle in the file or pass --bundle")
    problems = _check_files(cfg)
    if problems:
        field, problem = problems[0]
        raise ConfigError(f"config {'<command line>' if field in flags else where}: {field}: {problem}")
    return cfg


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The serve flags that override file fields (None = not given)."""
    return {
        "bundle": getattr(args, "bundle", None),
        "source": getattr(args, "source", None),
        "pub": getattr(args, "pub", None),
        "ctl": getattr(args, "ctl", None),
        "camera": getattr(args, "camera", None),
        "mode": getattr(args, "mode", None),
        "source_fps": getattr(args, "fps", None),
        "audio": getattr(args, "audio", None),
    }


def summary(cfg: DaemonConfig) -> str:
    """One line for logs and --validate-config."""
    return (
        f"camera={cfg.camera} source={cfg.source} bundle={cfg.bundle} mode={cfg.mode} pub={cfg.pub} "
        f"ctl={cfg.ctl} format={cfg.payload_format} curve={'on' if cfg.curve else 'off'}"
    )
