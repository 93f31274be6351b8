"""Learning-rate schedules with linear warm-up: cosine, step, plateau, constant.

One small class instead of chained torch schedulers: warm-up composes with every schedule the same
way (plateau included, which torch's SequentialLR cannot chain), it steps per batch so warm-up is
smooth even over a fraction of an epoch, and its state is a dict of plain numbers, which a
`torch.load(weights_only=True)` resume can read.
"""

from __future__ import annotations

import math
from typing import Any

import torch

WARMUP_START = 0.1  # warm-up starts at a tenth of the peak rate


class LRSchedule:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        peak_lr: float,
        steps_per_epoch: int,
        epochs: int,
        warmup_epochs: float = 0.0,
        step_size: int = 10,
        gamma: float = 0.1,
        plateau_patience: int = 2,
    ):
        if kind not in ("cosine", "step", "plateau", "constant"):
            raise ValueError(f"unknown schedule {kind!r}; use cosine, step, plateau or constant")
        self.optimizer, self.kind, self.peak = optimizer, kind, peak_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = self.steps_per_epoch * epochs
        self.warmup = round(warmup_epochs * self.steps_per_epoch)
        self.step_size, self.gamma, self.patience = step_size, gamma, plateau_patience
        self.step_count = 0
        self.plateau_scale = 1.0
        self.best = -math.inf
        self.bad_epochs = 0
        self._apply()

    def factor(self, step: int) -> float:
        """Multiplier of the peak rate at a given batch step."""
        if step < self.warmup:
            return WARMUP_START + (1 - WARMUP_START) * step / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "step":
            return float(self.gamma ** (step // (self.step_size * self.steps_per_epoch)))
        if self.kind == "plateau":
            return self.plateau_scale
        return 1.0

    @property
    def lr(self) -> float:
        return self.peak * self.factor(self.step_count)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        """After each optimizer step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, metric: float) -> None:
        """After validation: the plateau schedule decays when `metric` (higher is better) stalls."""
        if self.kind != "plateau":
            return
        if metric > self.best:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.plateau_scale *= self.gamma
                self.bad_epochs = 0
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()
