"""Turn a TrainConfig into the pieces a run needs: network + preprocessing, loaders, optimizer."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from model.architectures import SPEC_PRESETS, head_module
from model.preprocess import Preprocess
from model.registry import default_config, get_arch
from training.config import ConfigError, TrainConfig
from training.data import DataBundle, DataSpec, resolve_preprocess
from training.distributed import Dist
from training.netspec import parse_network


def build_network(cfg: TrainConfig, spec: DataSpec) -> tuple[dict[str, Any], Preprocess]:
    """-> (arch_config, preprocess). Unknown architectures and networks for torchvision models are
    configuration errors; the spec CNN itself is validated against the input size when built."""
    try:
        arch = get_arch(cfg.arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    own = cfg.arch in SPEC_PRESETS
    if cfg.network is not None and not own:
        raise ConfigError(
            f"a network config applies to {sorted(SPEC_PRESETS)}, not {cfg.arch}; drop it or the arch"
        )
    arch_config = parse_network(cfg.network) if cfg.network is not None else default_config(cfg.arch)
    pre = resolve_preprocess(spec, arch.default_preprocess, cfg, own)
    return arch_config, pre


def loaders(
    cfg: TrainConfig, data: DataBundle, info: Dist, device: torch.device
) -> tuple[DataLoader, DataLoader, Any]:
    workers = (
        cfg.workers
        if cfg.workers >= 0
        else (0 if data.in_memory else max(1, min(4, (os.cpu_count() or 1) // info.local_world_size - 1)))
    )
    assert data.train is not None, "loaders() needs the training split"
    if info.enabled:
        sampler: Any = DistributedSampler(data.train, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(data.train, generator=torch.Generator())
    # A last batch of one breaks batch norm on 1x1 maps; drop it only in that case.
    drop_last = len(sampler) % cfg.batch_size == 1
    common: dict[str, Any] = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        # Pinned pages only help a copy to a GPU; pinning for a CPU run on a GPU host would also
        # start a CUDA context for nothing.
        "pin_memory": device.type == "cuda",
    }
    train = DataLoader(data.train, cfg.batch_size, sampler=sampler, drop_last=drop_last, **common)
    # Validation shards are disjoint (no padding, unlike DistributedSampler) so sums are exact.
    val_set = Subset(data.val, range(info.rank, len(data.val), info.world_size)) if info.enabled else data.val
    val = DataLoader(val_set, cfg.batch_size * 2, shuffle=False, **common)
    return train, val, sampler


def optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and batch-norm scales: decaying them only hurts accuracy.
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.peak_lr)
    return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def zero_init_classifier(model: nn.Module) -> None:
    """Start the logits layer at zero: every class at equal odds, loss = ln(K). He init there gives
    logits with a std of about 6 and an initial loss near 10, which costs the first epochs."""
    last = [m for m in head_module(model).modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
