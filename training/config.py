"""TrainConfig: every training setting in one dataclass; the `train` CLI is generated from its fields.

Settings are layered: dataclass defaults < a config file (JSON or TOML) < command-line flags.
A config file holds TrainConfig fields at the top level plus two tables:

    network     the CNN as block specs (a list, or "conv 3x3x32 -> relu -> bn -> maxpool 2 -> ... -> gap")
    preprocess  model.preprocess.Preprocess fields (size, mode, channels, mean, std, ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work. The CLI prints it as one line (exit code 2), never a traceback."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    data: str = _f("shapes", "shapes | digits | folder:PATH | cifar10:ROOT | mnist:ROOT")
    arch: str = _f("convnet", "architecture name (see `describe --list`)")
    out: str = _f("runs/default", "output folder")
    epochs: int = _f(8, "number of epochs")
    batch_size: int = _f(32, "batch size per process")
    optimizer: str = _f("adamw", "adamw or sgd (with momentum)", ("adamw", "sgd"))
    lr: float | None = _f(None, "peak learning rate (default: 0.003 for adamw, 0.05 for sgd)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float | None = _f(None, "weight decay (default: 5e-4 for sgd, 0.05 for adamw)")
    schedule: str = _f("cosine", "learning-rate schedule", ("cosine", "step", "plateau", "constant"))
    warmup_epochs: float = _f(1.0, "linear warm-up from lr/10, in epochs (fractions allowed)")
    step_size: int = _f(10, "step schedule: epochs between decays")
    gamma: float = _f(0.1, "step/plateau schedule: decay factor")
    plateau_patience: int = _f(2, "plateau schedule: epochs without improvement before a decay")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    amp: bool = _f(True, "mixed precision on CUDA (ignored on the CPU)")
    channels_last: bool = _f(True, "NHWC memory layout: faster convolutions on CPU (oneDNN) and on GPUs")
    patience: int = _f(0, "early stopping: epochs without a better validation accuracy (0: off)")
    seed: int = _f(0, "seed for data generation, splits, initialisation and shuffling")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    workers: int = _f(-1, "data-loader worker processes (-1: auto)")
    threads: int = _f(0, "torch CPU threads per process (0: cores / processes)")
    resume: str | None = _f(None, "continue from a train_state.pt written by an earlier run")
    init_weights: str | None = _f(None, "start from local weights (.safetensors or .pth state dict)")
    freeze_backbone: bool = _f(False, "train only the classifier head (transfer learning)")
    image_size: int | None = _f(None, "model input side in pixels (default: from the data set/arch)")
    channels: int | None = _f(None, "1 or 3 input channels (default: from the data set/arch)")
    train_size: int = _f(5600, "shapes: number of generated training images")
    val_size: int = _f(1400, "shapes: number of generated validation images")
    val_fraction: float = _f(0.2, "digits/folder without val/: fraction held out, stratified")
    crop_scale: float | None = _f(None, "augmentation: random-resized-crop min area (0: off)")
    hflip: float | None = _f(None, "augmentation: horizontal flip probability")
    rotation: float | None = _f(None, "augmentation: max rotation in degrees")
    jitter: float | None = _f(None, "augmentation: colour jitter strength")
    name: str = _f("", "model name stored in the checkpoint (default: from arch and data)")
    progress: bool | None = _f(None, "progress bar per epoch (default: when stderr is a terminal)")
    # From a config file only (not flags): the network blocks and preprocessing overrides.
    network: Any = field(default=None, metadata={"cli": False})
    preprocess: dict[str, Any] | None = field(default=None, metadata={"cli": False})

    def validate(self) -> TrainConfig:
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 turns it off)"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (self.step_size >= 1, "--step-size must be at least 1"),
            (0 < self.gamma <= 1, "--gamma must be in (0, 1]"),
            (self.patience >= 0, "--patience must be >= 0 (0 turns early stopping off)"),
            (self.train_size >= 1 and self.val_size >= 1, "--train-size and --val-size must be >= 1"),
            (0 < self.val_fraction < 1, "--val-fraction must be between 0 and 1"),
            (self.channels in (None, 1, 3), "--channels must be 1 or 3"),
            (self.image_size is None or self.image_size >= 1, "--image-size must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.optimizer == "sgd" else 0.003)

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _base_type(annotation: Any) -> type:
    """`float | None` -> float. Annotations are strings under `from __future__ import annotations`."""
    hint = typing.get_type_hints(TrainConfig)[annotation] if isinstance(annotation, str) else annotation
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.cast(type, hint)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. Defaults are SUPPRESS so only flags actually given override."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="JSON or TOML file with settings and the network",
    )
    for name, f in FIELDS.items():
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _base_type(name)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata["choices"], help=help_text
            )


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a JSON or TOML config file into a dict of TrainConfig fields."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .json or .toml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold an object/table at the top level")
    raw.pop("description", None)  # free text for humans
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; known: {sorted(FIELDS)}")
    return raw


def build_config(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < base (e.g. a resumed run's settings) < config file < flags."""
    values: dict[str, Any] = dict(base or {})
    config_file = overrides.pop("config", None)
    if config_file is not None:
        values.update(read_config_file(Path(config_file)))
    values.update(overrides)
    for name, value in values.items():
        kind = _base_type(name)
        if value is None or kind is Any or kind is dict or name in ("network", "preprocess"):
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, kind):
            raise ConfigError(f"setting {name!r} must be of type {kind.__name__}, got {value!r}")
    return TrainConfig(**values).validate()
