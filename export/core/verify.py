"""``polymorphd bundle verify``: everything about a bundle that can be checked before it is loaded. Torch-free.

Schema version, the signature (required when a public key is given), every listed file present with its
sha256, no unlisted file, base_sha256, each graph's inputs/outputs (names, ranks, fixed dims, from ONNX
Runtime's session metadata: onnx is not on the board), adapter tensor names/shapes, and for an adapter
bundle that its base_sha256 matches the base's. Any problem raises BundleError naming the file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path, PurePosixPath

import onnxruntime as ort

from polymorphd.export.core.manifest import (
    MANIFEST,
    SIGNATURE,
    TAIL_TARGETS,
    Manifest,
    base_files,
    base_hash,
    load_manifest,
    sha256_file,
)
from polymorphd.export.core.signing import verify_signature
from polymorphd.models.core.errors import BundleError

log = logging.getLogger(__name__)

Dim = int | str  # str: a symbolic (dynamic) dim, any size
Shapes = dict[str, tuple[Dim, ...]]


def verify_bundle(
    path: str | Path, *, pubkey: str | Path | None = None, base: str | Path | None = None
) -> Manifest:
    """Check the bundle at ``path``; return its manifest. ``base``: the full bundle an adapter bundle is for."""
    root = Path(path)
    m = load_manifest(root)
    raw = (root / MANIFEST).read_bytes()
    if pubkey is not None:
        sig_path = root / SIGNATURE
        if not sig_path.is_file():
            raise BundleError(f"{sig_path}: missing: a public key was given, so the bundle must be signed")
        verify_signature(raw, sig_path.read_bytes(), pubkey)
    _check_files(root, m)
    if m.kind == "full":
        want = base_hash(m.files[f] for f in base_files(m))
        if want != m.base_sha256:
            raise BundleError(
                f"{root / MANIFEST}: base_sha256 {m.base_sha256[:12]}... does not match the graphs' hashes "
                f"({want[:12]}...): the manifest was edited; re-export the bundle"
            )
        for file, (ins, outs) in expected_graphs(m).items():
            check_graph_io(root / file, ins, outs)
        if m.tail_base:
            check_tensors(root / m.tail_base, tail_base_shapes(m))
    for a in m.adapters:
        check_tensors(root / a.file, adapter_shapes(m))
    if base is not None:
        _check_base(root, m, verify_bundle(base))
    log.info("verified %s: %s, %d files", root, m.ident, len(m.files))
    return m


def _check_files(root: Path, m: Manifest) -> None:
    for name in m.files:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or name in (MANIFEST, SIGNATURE):
            raise BundleError(
                f"{root / MANIFEST}: files entry {name!r} is not a plain path inside the bundle"
            )
    unlisted = [f for f in m.referenced_files() if f not in m.files]
    if unlisted:
        raise BundleError(
            f"{root / MANIFEST}: {unlisted} are referenced but have no sha256 in 'files'; re-export"
        )
    for name, digest in m.files.items():
        fpath = root / name
        if fpath.is_symlink():  # it could lead anywhere: reading it as part of a bundle would read that
            raise BundleError(
                f"{fpath}: a symbolic link; bundles hold plain files only: copy the bundle with its files"
            )
        if not fpath.is_file():
            raise BundleError(
                f"{fpath}: missing (listed in manifest.json): the bundle is incomplete; re-export it"
            )
        got = sha256_file(fpath)
        if got != digest:
            raise BundleError(
                f"{fpath}: sha256 {got[:12]}... differs from the manifest's {digest[:12]}...: the file changed "
                "after export (corrupt or tampered); re-export or re-copy the bundle"
            )
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(m.files) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError(
            f"{root / extra[0]}: not listed in manifest.json ({len(extra)} unlisted file(s): {extra[:5]}); "
            "bundles are immutable: remove it or re-export"
        )


def _check_base(root: Path, m: Manifest, b: Manifest) -> None:
    if b.kind != "full":
        raise BundleError(f"base bundle {b.ident} is an adapter bundle; --base must be a full bundle")
    if m.base_sha256 != b.base_sha256:
        raise BundleError(
            f"{root / MANIFEST}: base_sha256 {m.base_sha256[:12]}... does not match base {b.ident} "
            f"({b.base_sha256[:12]}...): this adapter bundle was exported for another base"
        )
    for key in ("classes", "model"):
        if getattr(m, key) != getattr(b, key):
            raise BundleError(
                f"{root / MANIFEST}: {key} differ from base {b.ident}'s; re-export for this base"
            )
    if m.lora.get("names") != b.lora.get("names"):
        raise BundleError(
            f"{root / MANIFEST}: LoRA names differ from base {b.ident}'s; re-export for this base"
        )


def expected_graphs(m: Manifest) -> dict[str, tuple[Shapes, Shapes]]:
    """Graph file -> (inputs, outputs) per docs/bundle.md; str dims are dynamic."""
    md = m.model
    s, c, n, k, ch = m.input["size"], md["embed_dim"], md["num_tokens"], len(m.classes), md["in_chans"]
    tok: tuple[Dim, ...] = ("B", n, c)
    probs: tuple[Dim, ...] = ("B", k)
    out: dict[str, tuple[Shapes, Shapes]] = {}
    for i, f in enumerate(m.segments):
        ins = {"image": ("B", ch, s, s)} if i == 0 else {"tokens": tok}
        out[f] = (ins, {"tokens" if i == 0 else "tokens_out": tok})
    for e in m.exits:
        out[e.file] = ({"tokens": tok}, {"probs": probs})
    if m.audio is not None:
        mel = (m.audio.mel["n_mels"], m.audio.mel["frames"])
        for e in m.audio.exits:
            out[e.file] = ({"tokens": tok, "mel": ("B", *mel)}, {"probs": probs, "count": ("B",)})
    if m.tail:
        out[m.tail] = ({"tokens": tok}, {"probs": probs})
    if m.tail_lora:
        lora: Shapes = {"tokens": (1, n, c)}
        for name, shape in adapter_shapes(m).items():
            lora[name] = ("M", *shape[1:])
        out[m.tail_lora] = (lora, {"probs": ("M", k)})
    if m.tail_weights:
        out[m.tail_weights] = ({"tokens": tok, **tail_base_shapes(m)}, {"probs": probs})
    return out


def adapter_shapes(m: Manifest) -> dict[str, tuple[int, ...]]:
    """Adapter file tensors: lora_A (1, r, in), lora_B (1, out, r), head_w (1, K, C), head_b (1, K)."""
    r, k, c = int(m.lora["rank"]), len(m.classes), m.model["embed_dim"]
    out: dict[str, tuple[int, ...]] = {}
    for name in m.lora["names"]:
        fin, fout = m.target_dims(name.split(".", 2)[2])
        out[f"lora_A.{name}"] = (1, r, fin)
        out[f"lora_B.{name}"] = (1, fout, r)
    return {**out, "head_w": (1, k, c), "head_b": (1, k)}


def tail_base_shapes(m: Manifest) -> dict[str, tuple[int, ...]]:
    """tail_weights inputs / tail_base tensors: w (out, in), b (out) per tail linear, head_w (K, C), head_b (K)."""
    out: dict[str, tuple[int, ...]] = {}
    for blk in range(int(m.tail_start or 0), m.model["depth"]):
        for t in TAIL_TARGETS:
            fin, fout = m.target_dims(t)
            out[f"w.blocks.{blk}.{t}"] = (fout, fin)
            out[f"b.blocks.{blk}.{t}"] = (fout,)
    return {**out, "head_w": (len(m.classes), m.model["embed_dim"]), "head_b": (len(m.classes),)}


def check_graph_io(path: Path, inputs: Shapes, outputs: Shapes) -> None:
    """The graph's inputs/outputs must have exactly these names, ranks and fixed dims (str dims dynamic)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # metadata only: load fast
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph: {exc}") from exc
    for kind, want, got in (
        ("input", inputs, {i.name: i for i in sess.get_inputs()}),
        ("output", outputs, {o.name: o for o in sess.get_outputs()}),
    ):
        missing = [n for n in want if n not in got]
        if missing:
            raise BundleError(
                f"{path}: {kind}(s) {missing[:4]} not found in graph {kind}s. Valid {kind} names are: "
                f"{sorted(got)[:8]}; the bundle does not match docs/bundle.md: re-export it"
            )
        extra = [n for n in got if n not in want]
        if extra:
            raise BundleError(
                f"{path}: unexpected graph {kind}(s) {extra[:4]}; expected only {sorted(want)[:8]}"
            )
        for name, shape in want.items():
            arg = got[name]
            if arg.type != "tensor(float)":
                raise BundleError(f"{path}: {kind} {name} has type {arg.type}, expected tensor(float)")
            _check_shape(path, f"{kind} {name}", tuple(arg.shape), shape)


def _check_shape(path: Path, what: str, got: tuple, want: tuple[Dim, ...]) -> None:
    if len(got) != len(want):
        raise BundleError(
            f"{path}: {what} has rank {len(got)} {list(got)}, expected rank {len(want)} {list(want)}"
        )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, int) and g != w:
            raise BundleError(
                f"{path}: {what} dim {i} is {g}, expected {w} (shape {list(got)} vs {list(want)})"
            )
        if isinstance(w, str) and isinstance(g, int):
            raise BundleError(f"{path}: {what} dim {i} is fixed to {g}, expected the dynamic dim {w!r}")


def check_tensors(path: Path, want: dict[str, tuple[int, ...]]) -> None:
    """An ORT adapter-format file must hold exactly these float32 tensors with these shapes."""
    if not path.is_file():
        raise BundleError(f"{path}: missing")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        got = {k: (tuple(v.shape()), v.data_type()) for k, v in params.items()}
    except Exception as exc:  # ORT raises its own error types for a corrupt flatbuffer
        raise BundleError(f"{path}: ONNX Runtime cannot read this adapter file: {exc}") from exc
    missing = sorted(set(want) - set(got))
    if missing:
        raise BundleError(f"{path}: tensor(s) {missing[:4]} not found; the file holds {sorted(got)[:6]}...")
    extra = sorted(set(got) - set(want))
    if extra:
        raise BundleError(f"{path}: unexpected tensor(s) {extra[:4]}")
    for name, shape in want.items():
        gshape, dtype = got[name]
        if dtype != "tensor(float)":
            raise BundleError(f"{path}: tensor {name} has type {dtype}, expected tensor(float)")
        _check_shape(path, f"tensor {name}", gshape, shape)


def cli_verify(args: argparse.Namespace) -> int:
    m = verify_bundle(args.bundle, pubkey=args.pubkey, base=args.base)
    signed = (Path(args.bundle) / SIGNATURE).is_file()
    state = (
        "signed" if signed and args.pubkey else "signed, not checked: no --pubkey" if signed else "unsigned"
    )
    print(f"OK {m.ident} ({len(m.files)} files, {state})")
    return 0
