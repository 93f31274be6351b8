"""The files a run writes for later: serving checkpoints (safetensors) and the resume state.

The serving checkpoint is what the service loads; the training state (optimizer, schedule, epoch,
history) is a separate torch file that only `--resume` reads, with `weights_only=True` so loading it
cannot run code.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import CheckpointMeta, save_checkpoint
from model.preprocess import Preprocess
from training.config import ConfigError, TrainConfig
from training.data import DataBundle, DataSpec

STATE_FORMAT = 1


def checkpoint_meta(
    cfg: TrainConfig,
    spec: DataSpec,
    labels: list[str],
    pre: Preprocess,
    arch_config: dict[str, Any],
    data: DataBundle,
    val_digest: str | None,
) -> CheckpointMeta:
    """Everything but the per-epoch results. `data_args` lets `evaluate` rebuild the same
    validation split (shapes are generated from the seed; splits are drawn with it), and `val_digest`
    lets it tell when that rebuild gives other images than training validated on."""
    training = {
        "data": str(spec),
        "data_args": {
            "seed": cfg.seed,
            "train_size": cfg.train_size,
            "val_size": cfg.val_size,
            "val_fraction": cfg.val_fraction,
        },
        "train_images": len(data.train) if data.train is not None else 0,
        "val_images": len(data.val),
        "val_digest": val_digest,
        "skipped_files": len(data.skipped),
        "epochs_planned": cfg.epochs,
        "optimizer": cfg.optimizer,
        "lr": cfg.peak_lr,
        "weight_decay": cfg.decay,
        "schedule": cfg.schedule,
        "batch_size": cfg.batch_size,
        "label_smoothing": cfg.label_smoothing,
        "init_weights": Path(cfg.init_weights).name if cfg.init_weights else None,
        "freeze_backbone": cfg.freeze_backbone,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torch": torch.__version__,
    }
    name = cfg.name or f"{cfg.arch}-{spec.kind}"
    return CheckpointMeta(
        arch=cfg.arch,
        labels=list(labels),
        preprocess=pre.to_dict(),
        arch_config=arch_config,
        training=training,
        name=name,
    )


def history_meta(history: list[dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    """The per-epoch rows stored in the checkpoint (CheckpointMeta.training["history"]) for the model
    card's curves: a few numbers per epoch, 5 significant digits, so the header stays small.
    val_top5 is null below 5 classes, where it is always 1 and says nothing."""
    def num(v: Any) -> float:
        return float(f"{float(v):.5g}")

    return [{"epoch": int(r["epoch"]), "train_loss": num(r["train_loss"]), "val_loss": num(r["val_loss"]),
             "val_top1": num(r["val_acc"]), "val_top5": num(r["val_top5"]) if num_classes >= 5 else None,
             "lr": num(r["lr"])} for r in history]


def save_serving(
    path: Path, model: nn.Module, base: CheckpointMeta, summary: dict[str, Any]
) -> CheckpointMeta:
    meta = copy.deepcopy(base)
    meta.training.update(summary)
    meta.training["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return save_checkpoint(path, model, meta)


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous state intact


def load_state(path: Path) -> dict[str, Any]:
    """Read a train_state.pt. weights_only=True: tensors and plain containers only, no code runs."""
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such file; give the train_state.pt of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--resume {path} is not a readable training state: {first}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"--resume {path} is not a convserve train_state.pt (format {STATE_FORMAT})")
    return state
