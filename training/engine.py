"""The two verbs of training: train_one_epoch() and evaluate(). Plain functions, no files, no ranks."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from model.architectures import freeze_frozen_batchnorm
from training.schedule import LRSchedule


@dataclass
class EpochStats:
    loss_sum: float
    correct: int
    count: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and x.ndim == 4 else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=fmt)


def _autocast(device: torch.device, amp: bool) -> Any:
    # Mixed precision only where it pays: CUDA. On the CPU bf16 autocast is slower for these convs.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    amp: bool = False,
    channels_last: bool = False,
    progress: str | None = None,
) -> EpochStats:
    """One pass over `loader`; `progress` is the bar's label (None: no bar)."""
    model.train()
    freeze_frozen_batchnorm(model)  # a frozen backbone's running statistics stay as loaded
    start = time.perf_counter()
    loss_sum, correct, count = 0.0, 0, 0
    bar = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True, disable=progress is None)
    for x, y in bar:  # x: (B, C, H, W), y: (B,)
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)  # (B, K)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # so clipping sees the true gradient norm
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step()
        n = y.numel()
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        count += n
        bar.set_postfix(
            loss=f"{loss_sum / count:.4f}",
            acc=f"{correct / count:.3f}",
            lr=f"{schedule.lr:.2g}",
            refresh=False,
        )
    bar.close()
    return EpochStats(loss_sum, correct, count, time.perf_counter() - start)


@dataclass
class EvalResult:
    """Sums, so results from several processes add up exactly (see distributed.all_reduce_eval)."""

    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = predicted
    loss_sum: float
    top5_correct: int
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(1, self.count)

    @property
    def top5(self) -> float:
        return self.top5_correct / max(1, self.count)

    def per_class(self) -> list[dict[str, float | int]]:
        """Precision, recall, F1 and support per class (0 where undefined)."""
        cm = self.confusion.to(torch.float64)
        tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
        rows = []
        for k in range(cm.shape[0]):
            p = float(tp[k] / predicted[k]) if predicted[k] else 0.0
            r = float(tp[k] / actual[k]) if actual[k] else 0.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            rows.append({"precision": p, "recall": r, "f1": f1, "support": int(actual[k])})
        return rows


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    num_classes: int,
    *,
    amp: bool = False,
    channels_last: bool = False,
    progress: str | None = None,
) -> EvalResult:
    """Loss, confusion matrix and top-5 hits over `loader` (softmax is implied by cross-entropy)."""
    model.eval()
    start = time.perf_counter()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, top5 = 0.0, 0
    k = min(5, num_classes)
    for x, y in tqdm(loader, desc=progress, leave=False, dynamic_ncols=True, disable=progress is None):
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)  # (B, K)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        top5 += int((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum())
        pairs = (y * num_classes + logits.argmax(1)).cpu()
        confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
    return EvalResult(confusion, loss_sum, top5, time.perf_counter() - start)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits (N, K) float32, targets (N,) int64), on the CPU, in the loader's order: what
    calibration and sample predictions are computed from (one pass, no softmax applied)."""
    model.eval()
    all_logits, all_targets = [], []
    for x, y in loader:
        with _autocast(device, amp):
            logits = model(_to(x, device, channels_last))  # (B, K)
        all_logits.append(logits.float().cpu())
        all_targets.append(y.cpu())
    return torch.cat(all_logits), torch.cat(all_targets)
