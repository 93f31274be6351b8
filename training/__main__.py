"""`python -m training [train|evaluate|export|quantize|describe] ...` (and the `convserve-train` script).

`train` is the default subcommand: `python -m training` trains the default CNN on the built-in shapes.
A configuration that cannot work is reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from model.checkpoint import CheckpointError
from training.config import FIELDS, ConfigError, add_train_arguments, build_config

SUBCOMMANDS = ("train", "evaluate", "export", "quantize", "describe")
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", parents=[common], help="train a model (default)")
    add_train_arguments(train)
    # A flag, not a TrainConfig setting: the consent must not be saved and silently reused by later resumes.
    train.add_argument(
        "--allow-split-change",
        action="store_true",
        help="--resume even if the validation split differs from the recorded one (the data changed), "
        "though validation images may then have been trained on",
    )

    ev = sub.add_parser("evaluate", parents=[common], help="evaluate a checkpoint on a data set")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--data", help="data set (default: the one recorded in the checkpoint)")
    ev.add_argument("--out", type=Path, help="also write report.json/.md and confusion_matrix.png here")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--device", default="auto")
    for name in ("seed", "val_size", "val_fraction"):  # to rebuild a different split than recorded
        ev.add_argument(
            "--" + name.replace("_", "-"),
            type=type(FIELDS[name].default),
            default=argparse.SUPPRESS,
            help=FIELDS[name].metadata["help"],
        )

    ex = sub.add_parser("export", parents=[common], help="write a serving checkpoint without training")
    ex.add_argument("--out", type=Path, required=True, help="the .safetensors (or --format onnx: .onnx) file")
    ex.add_argument(
        "--format",
        choices=["safetensors", "onnx"],
        help="safetensors: a serving checkpoint; onnx: a standalone ONNX file of --checkpoint, labels and "
        "preprocessing in its metadata_props (default: from the --out suffix)",
    )
    ex.add_argument("--checkpoint", type=Path, help="with --format onnx: the checkpoint to convert")
    ex.add_argument("--num-classes", type=int)
    ex.add_argument("--labels", type=Path, help="class names, one per line (or a JSON list)")
    ex.add_argument("--version", default="1")
    _model_arguments(ex)
    ex.add_argument("--init-weights", help="local weights to start from (.safetensors, or .pth state dict)")
    ex.add_argument("--name", default="", help="model name shown by the service (default: file stem)")
    ex.add_argument("--seed", type=int, default=0, help="seed for random weights")

    qu = sub.add_parser("quantize", parents=[common], help="int8 ONNX file, static post-training")
    qu.add_argument("--checkpoint", type=Path, required=True, help="the fp32 .safetensors checkpoint")
    qu.add_argument("--data", help="calibration and validation data (default: the checkpoint's)")
    qu.add_argument("--calibration-images", type=int, default=512, help="training images to calibrate on")
    qu.add_argument("--out", type=Path, help="default: the checkpoint's path with .int8.onnx")
    qu.add_argument("--seed", type=int, default=0, help="which calibration images are drawn")

    de = sub.add_parser("describe", parents=[common], help="per-layer shapes, parameters, receptive fields")
    _model_arguments(de)
    de.add_argument("--num-classes", type=int, default=10)
    de.add_argument("--list", action="store_true", help="list the architectures and exit")
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture (default: the config file's, else convnet)")
    p.add_argument("--config", type=Path, help="JSON/TOML file with a network and/or preprocess table")
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int)


def _model_config(args: argparse.Namespace, **extra: Any) -> Any:
    overrides = {"arch": args.arch, "image_size": args.image_size, "channels": args.channels, **extra}
    if args.config:
        overrides["config"] = args.config
    return build_config({k: v for k, v in overrides.items() if v is not None or k == "config"})


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from training.fit import train
        from training.runs import load_state

        overrides = {k: v for k, v in vars(args).items() if k in FIELDS or k == "config"}
        state = load_state(Path(overrides["resume"])) if overrides.get("resume") else None
        cfg = build_config(overrides, base=state["config"] if state else None)
        train(cfg, state, allow_split_change=args.allow_split_change)
        return 0
    if args.command == "evaluate":
        from training.commands import run_evaluate

        overrides = {k: getattr(args, k) for k in ("seed", "val_size", "val_fraction") if hasattr(args, k)}
        report = run_evaluate(args.checkpoint, args.data, args.out, args.batch_size, args.device, overrides)
        k = min(5, len(report["labels"]))
        print(
            f"{report['checkpoint']} on {report['data']} ({report['samples']} images): "
            f"top-1 {report['top1']:.4f}"
            f"  top-{k} {report['top5']:.4f}  loss {report['loss']:.4f}  macro-F1 {report['macro']['f1']:.4f}"
        )
        for label, row in report["per_class"].items():
            print(
                f"  {label:<16} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
                f"F1 {row['f1']:.3f}  support {row['support']}"
            )
        if args.out:
            print(f"wrote {args.out}/report.json, report.md, confusion_matrix.png")
        return 0
    if args.command == "export" and (args.format or ("onnx" if args.out.suffix == ".onnx" else "")) == "onnx":
        from training.onnx_export import export_checkpoint_onnx

        if args.checkpoint is None:
            raise ConfigError("export --format onnx converts a checkpoint: pass --checkpoint FILE")
        print(json.dumps(export_checkpoint_onnx(args.checkpoint, args.out)))
        return 0
    if args.command == "quantize":
        from training.onnx_export import run_quantize

        out = args.out or args.checkpoint.with_suffix(".int8.onnx")
        print(json.dumps(run_quantize(args.checkpoint, args.data, args.calibration_images, out, args.seed)))
        return 0
    if args.command == "export":
        from training.commands import run_export

        cfg = _model_config(args, init_weights=args.init_weights, name=args.name, seed=args.seed)
        meta = run_export(cfg, args.num_classes, args.labels, args.out, args.version)
        print(
            json.dumps(
                {
                    "wrote": str(args.out),
                    "arch": meta.arch,
                    "num_classes": meta.num_classes,
                    "input_shape": list(meta.input_shape),
                    "weights_sha256": meta.weights_sha256,
                }
            )
        )
        return 0
    from training.commands import describe, list_architectures

    print(list_architectures() if args.list else describe(_model_config(args), args.num_classes))
    return 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO, format=prefix + "%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("model.device").setLevel(logging.WARNING)  # its one-line device note is in our summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "train")  # `python -m training [--flags]` trains
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        return _run(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        # SpecError (a network that cannot work) and the registry's unknown-arch error are ValueErrors.
        if args.traceback:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
