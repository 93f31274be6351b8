"""What runs once after the last epoch, on rank 0: calibrate the best model and show its predictions.

model.safetensors (the best epoch's weights, as saved) is read back, run over the whole validation
split once, and re-saved with its fitted temperature (CheckpointMeta.calibration) and the run's full
per-epoch history; reliability.png and samples.png are drawn from the same logits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.checkpoint import load_checkpoint, save_checkpoint
from model.preprocess import Preprocess
from training import reports
from training.calibrate import calibrate
from training.data import DataBundle
from training.engine import predict_logits
from training.runs import history_meta

log = logging.getLogger(__name__)
SAMPLES = 32  # images in samples.png: 4 rows of 8


def finish(
    out: Path,
    data: DataBundle,
    device: torch.device,
    history: list[dict[str, Any]],
    *,
    batch_size: int,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, Any]:
    """-> the calibration record (also stored in the checkpoint, for the report)."""
    path = out / "model.safetensors"
    loaded = load_checkpoint(path)
    model = loaded.model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # The whole split, in order: under DDP only rank 0 runs this, so it does not use its shard's loader.
    loader = DataLoader(data.val, batch_size, shuffle=False)
    logits, targets = predict_logits(model, loader, device, amp=amp, channels_last=channels_last)
    record = calibrate(logits, targets)
    meta = loaded.meta
    meta.calibration = record
    meta.training["history"] = history_meta(history, meta.num_classes)  # the whole run, not up to the best
    save_checkpoint(path, model, meta)
    log.info("temperature scaling: T = %.4g, ECE %.4f -> %.4f, NLL %.4f -> %.4f on %d validation images%s",
             record["temperature"], record["ece_before"], record["ece_after"], record["nll_before"],
             record["nll_after"], record["images"],
             f" ({record['note']})" if record["note"] else "")
    reports.plot_reliability(out / "reliability.png", record)
    probs = (logits.double() / record["temperature"]).softmax(dim=1)
    write_samples(out / "samples.png", data, loaded.preprocess, probs, targets, meta.labels)
    return record


def write_samples(
    path: Path, data: DataBundle, pre: Preprocess, probs: torch.Tensor, targets: torch.Tensor,
    labels: list[str], count: int = SAMPLES,
) -> list[int]:
    """samples.png from the (calibrated) probabilities; -> the validation indices shown."""
    conf, pred = probs.max(dim=1)
    order = reports.sample_order(pred.tolist(), targets.tolist(), conf.tolist())[:count]
    images = [_display(data.val[i][0], pre) for i in order]
    reports.plot_samples(path, images, [labels[int(targets[i])] for i in order],
                         [labels[int(pred[i])] for i in order], [float(conf[i]) for i in order])
    return order


def _display(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """A normalised (C, H, W) tensor back to an (H, W, C) image in [0, 1]."""
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
