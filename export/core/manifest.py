"""The bundle manifest (docs/bundle.md): a strict dataclass, JSON in and out, plus hashing. Torch-free.

Everything needed to load and validate a bundle without torch lives here: the exporter writes a
``Manifest``, ``verify`` and the daemon read it back with ``load_manifest``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from polymorphd.models.core.errors import BundleError
from polymorphd.models.core.lora_targets import TARGETS, target_dims
from polymorphd.models.core.melspec import MelConfig

SCHEMA_VERSION = 1
AUDIO_SCHEMA_VERSION = 2  # a bundle with an ``audio`` block: older polymorphd refuse it by its version
READS = (SCHEMA_VERSION, AUDIO_SCHEMA_VERSION)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
REPORT = "export_report.json"
Kind = Literal["full", "adapters"]

TAIL_TARGETS = (
    TARGETS  # every linear of a tail block: tail_weights.onnx's inputs (models/core/lora_targets.py)
)


@dataclass
class ContextEntry:
    id: int
    name: str
    classes: list[int]


@dataclass
class ExitEntry:
    after_block: int
    file: str
    threshold: dict[str, float]  # {"lo": .., "hi": ..}
    kind: str = "slvit"
    # logits centred on the exit's own per-class thresholds (p = 0.5 at each); the engine maps its scores onto
    # the final classifier's scale before publishing them
    centred: bool = False


@dataclass
class AdapterEntry:
    context: int
    file: str
    rank: int


@dataclass
class AudioExitEntry:
    """An audiovisual exit (docs/bundle.md "Audio"): (tokens, mel) -> (probs, count), beside the visual exit
    at the same block; it answers when the label rule (lo, hi) and the count rule (count_margin) both hold."""

    after_block: int
    file: str
    threshold: dict[str, float]  # {"lo": .., "hi": ..}
    count_margin: float
    centred: bool = True


@dataclass
class AudioBlock:
    """The optional ``audio`` block (schema_version 2): the log-mel front end the daemon computes (numpy) and
    the audiovisual exits that read it."""

    mel: dict[str, Any]  # models/core/melspec.MelConfig fields
    exits: list[AudioExitEntry]


@dataclass
class Manifest:
    """manifest.json as a dataclass. A full bundle fills every field; an adapter bundle (kind "adapters")
    leaves the graph fields empty."""

    kind: Kind
    bundle_id: str
    version: int
    created: str
    base_sha256: str
    classes: list[str]
    contexts: list[ContextEntry]
    lora: dict[str, Any]  # rank, alpha, targets, names
    adapters: list[AdapterEntry]
    class_thresholds: list[float]
    policy: dict[str, Any]
    model: dict[str, int]  # embed_dim, num_tokens, mlp_hidden, depth, num_classes, patch_size, in_chans
    files: dict[str, str]  # relative path -> sha256, every file but manifest.json / manifest.sig
    schema_version: int = SCHEMA_VERSION
    input: dict[str, Any] = field(default_factory=dict)
    class_ids: list[int] = field(default_factory=list)
    exits: list[ExitEntry] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    segment_blocks: list[list[int]] = field(default_factory=list)
    tail: str | None = None
    tail_lora: str | None = None
    tail_weights: str | None = None
    tail_base: str | None = None  # tail_weights' generalist inputs, for the merged baseline
    tail_start: int | None = None
    gflops: dict[str, Any] | None = None
    export: dict[str, Any] = field(default_factory=dict)
    audio: AudioBlock | None = None  # schema_version 2 only; absent from the JSON of a bundle without audio

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = MANIFEST) -> Manifest:
        """Strict: the schema version must be ours, no key may be unknown, required keys must be present."""
        if not isinstance(d, Mapping):
            raise BundleError(f"{source}: top level must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version not in READS or isinstance(version, bool):
            raise BundleError(
                f"{source}: unsupported schema_version {version} (this polymorphd reads {list(READS)}): "
                "re-export the bundle with this polymorphd, or upgrade polymorphd to read it"
            )
        if (version == AUDIO_SCHEMA_VERSION) != ("audio" in d):
            raise BundleError(
                f"{source}: schema_version {version} {'cannot carry' if 'audio' in d else 'needs'} an 'audio' block "
                f"(schema_version {AUDIO_SCHEMA_VERSION} is exactly the bundles with audio exits); re-export"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(
                f"{source}: unknown key(s) {unknown} for schema_version {SCHEMA_VERSION}; "
                "the bundle was written by another polymorphd: re-export it with this one"
            )
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise BundleError(f"{source}: missing key(s) {missing}; the manifest is incomplete: re-export")
        if d["kind"] not in ("full", "adapters"):
            raise BundleError(f"{source}: kind {d['kind']!r} invalid: expected 'full' or 'adapters'")
        try:
            m = cls(
                **{k: v for k, v in d.items() if k not in ("contexts", "exits", "adapters", "audio")},
                contexts=[ContextEntry(**c) for c in d["contexts"]],
                exits=[ExitEntry(**e) for e in d.get("exits", [])],
                adapters=[AdapterEntry(**a) for a in d["adapters"]],
                audio=_audio_block(d["audio"]) if "audio" in d else None,
            )
        except (TypeError, AttributeError) as exc:
            raise BundleError(f"{source}: malformed contexts/exits/adapters/audio entry: {exc}") from exc
        for name, want in (("version", int), ("bundle_id", str), ("base_sha256", str), ("files", dict)):
            value = getattr(m, name)
            if not isinstance(value, want) or isinstance(value, bool):
                raise BundleError(f"{source}: {name} must be of type {want.__name__}, got {value!r:.60}")
        if m.version < 1:
            raise BundleError(f"{source}: version must be >= 1, got {m.version}")
        if m.kind == "full":
            absent = [k for k in ("segments", "tail", "tail_lora", "tail_start") if not getattr(m, k)]
            if absent:
                raise BundleError(f"{source}: a full bundle needs {absent}; re-export it")
        if m.audio is not None:
            _check_audio(m, source)
        return m

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.audio is None:
            del d["audio"]  # a bundle without audio is written exactly as before the audio block existed
        order = ["schema_version", "kind", "bundle_id", "version", "created", "base_sha256"]
        return {**{k: d[k] for k in order}, **{k: v for k, v in d.items() if k not in order}}

    def to_json(self) -> bytes:
        """The exact bytes written to manifest.json (and signed)."""
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @property
    def ident(self) -> str:
        return f"{self.bundle_id}@{self.version}"

    def graph_files(self) -> list[str]:
        """Every ONNX graph the manifest names, in base-hash order first (segments, tails), then exits."""
        tails = [f for f in (self.tail, self.tail_lora, self.tail_weights) if f]
        audio = [e.file for e in self.audio.exits] if self.audio else []
        return [*self.segments, *tails, *(e.file for e in self.exits), *audio]

    def adapter_files(self) -> list[str]:
        return [a.file for a in self.adapters]

    def referenced_files(self) -> list[str]:
        """Files the manifest points at (all must also be in ``files``)."""
        return [*self.graph_files(), *self.adapter_files(), *([self.tail_base] if self.tail_base else [])]

    def target_dims(self, target: str) -> tuple[int, int]:
        """(in, out) of a tail linear / LoRA target, from ``model``."""
        try:
            return target_dims(target, self.model["embed_dim"], self.model["mlp_hidden"])
        except ValueError as exc:
            raise BundleError(
                f"{MANIFEST}: {exc}; the bundle names a layer this polymorphd lacks: re-export it"
            ) from exc


def _audio_block(d: Any) -> AudioBlock:
    if not isinstance(d, Mapping):
        raise TypeError(f"'audio' must be an object, got {type(d).__name__}")
    return AudioBlock(mel=dict(d["mel"]), exits=[AudioExitEntry(**e) for e in d["exits"]])


def _check_audio(m: Manifest, source: str) -> None:
    """The audio block's exits sit where the visual exits sit (the daemon falls back to those), one each."""
    assert m.audio is not None
    if m.kind != "full":
        raise BundleError(f"{source}: an adapter bundle cannot carry an 'audio' block; re-export it")
    got = [e.after_block for e in m.audio.exits]
    want = [e.after_block for e in m.exits]
    if got != want:
        raise BundleError(
            f"{source}: audio exits sit after blocks {got}, the visual exits after {want}: each audiovisual "
            "exit needs its visual twin (the fallback when audio fails); re-export"
        )
    try:
        MelConfig(**m.audio.mel)
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{source}: audio mel {m.audio.mel} is not a valid front end: {exc}; re-export"
        ) from exc
    for e in m.audio.exits:
        lo, hi = e.threshold.get("lo"), e.threshold.get("hi")
        if not (isinstance(lo, float | int) and isinstance(hi, float | int) and 0 <= lo <= hi <= 1):
            raise BundleError(
                f"{source}: audio exit {e.file} threshold {e.threshold} needs 0 <= lo <= hi <= 1"
            )
        margin = e.count_margin
        number = isinstance(margin, float | int) and not isinstance(margin, bool)
        if not (number and (margin == -1 or 0 <= margin <= 0.5)):
            raise BundleError(
                f"{source}: audio exit {e.file} count_margin {margin!r} must be in [0, 0.5] or -1 (never answers)"
            )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(root: Path, names: Iterable[str]) -> dict[str, str]:
    return {n: sha256_file(root / n) for n in names}


def base_hash(file_hashes: Iterable[str]) -> str:
    """base_sha256: sha256 of the concatenated hex digests of segments, tail, tail_lora, tail_weights."""
    return hashlib.sha256("".join(file_hashes).encode()).hexdigest()


def base_files(m: Manifest) -> list[str]:
    """The files whose hashes make base_sha256, in order."""
    return [*m.segments, *(f for f in (m.tail, m.tail_lora, m.tail_weights) if f)]


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json`` (schema only; ``verify_bundle`` checks the files)."""
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        what = "is not a directory" if Path(bundle_dir).exists() else "does not exist"
        raise BundleError(
            f"bundle directory {bundle_dir} {what}; pass the directory that holds manifest.json"
        )
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing: {bundle_dir} is not a bundle (export one first)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); the bundle is corrupt: re-export it") from exc
    return Manifest.from_dict(data, source=str(path))
