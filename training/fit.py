"""`train`: build data and model from a TrainConfig, run the epochs, write checkpoints and reports.

Writes to cfg.out: model.safetensors (best validation accuracy), last.safetensors, train_state.pt
(resume), history.csv, loss.png, accuracy.png, confusion_matrix.png, reliability.png, samples.png,
report.json, report.md. model.safetensors carries the per-epoch history and, after the last epoch, a
temperature fitted on the validation split (training/finalize.py).
Under torchrun every rank trains on its shard of the data; only rank 0 writes.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from model.architectures import freeze_backbone
from model.checkpoint import weights_sha256
from model.registry import build_model, load_init_weights
from training import build, distributed, finalize, reports
from training.config import ConfigError, TrainConfig
from training.data import DataBundle, DataSpec, load_data, resolve_augment, split_changed
from training.engine import EpochStats, EvalResult, evaluate, train_one_epoch
from training.runs import checkpoint_meta, history_meta, save_serving, save_state
from training.schedule import LRSchedule

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    out: Path
    best_accuracy: float
    best_epoch: int
    epochs_run: int
    model: nn.Module  # unwrapped, on its device, final (last-epoch) weights


@dataclass
class Progress:
    """What a resume restores besides weights and optimizer: per-epoch rows and the best epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"acc": -1.0, "loss": float("inf"), "epoch": 0})
    bad_epochs: int = 0

    def update(self, epoch: int, result: EvalResult) -> bool:
        """Record an epoch's validation; True when it is the best so far (accuracy, then loss)."""
        best = self.best
        improved = result.accuracy > best["acc"] or (
            result.accuracy == best["acc"] and result.loss < best["loss"]
        )
        if improved:
            # the sums are kept so the final report is the best epoch's, without another pass
            self.best = {"acc": result.accuracy, "loss": result.loss, "top5": result.top5, "epoch": epoch,
                         "confusion": result.confusion, "loss_sum": result.loss_sum,
                         "top5_correct": result.top5_correct}
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return improved

    def best_eval(self) -> EvalResult:
        return EvalResult(self.best["confusion"], self.best["loss_sum"], self.best["top5_correct"])


def train(
    cfg: TrainConfig, state: dict[str, Any] | None = None, allow_split_change: bool = False
) -> FitResult:
    """`allow_split_change`: resume even when the validation split differs from the recorded one."""
    info, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, state, info, device, allow_split_change)
    finally:
        distributed.cleanup()


def _train(
    cfg: TrainConfig,
    state: dict[str, Any] | None,
    info: distributed.Dist,
    device: torch.device,
    allow_split_change: bool = False,
) -> FitResult:
    threads = distributed.set_threads(info, cfg.threads)
    build.seed_everything(cfg.seed)
    spec = DataSpec.parse(cfg.data)
    arch_config, pre = build.build_network(cfg, spec)
    data = load_data(spec, pre, resolve_augment(spec, cfg), cfg)
    assert data.train is not None
    val_digest = _resumed_split(cfg, state, data, allow_split_change, info.is_main)
    labels = data.labels
    model = build_model(cfg.arch, len(labels), pre.channels, pre.size, arch_config or None)
    if cfg.init_weights:
        skipped = load_init_weights(model, Path(cfg.init_weights))
        log.info("initial weights from %s (%d head tensors re-initialised)", cfg.init_weights, len(skipped))
    else:
        build.zero_init_classifier(model)
    if cfg.freeze_backbone:
        log.info("backbone frozen: %d trainable parameters", freeze_backbone(model))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if info.enabled:
        # The weights start equal on every rank (DDP broadcasts rank 0's too) and the data order comes
        # from the sampler's own seed; what draws from the global generators from here on (dropout,
        # augmentation, DataLoader worker seeds) must differ between ranks, or every rank applies the
        # same dropout masks and crops to its shard.
        build.seed_everything(cfg.seed + info.rank)
        log.info("rank %d: random ops seeded with %d (seed + rank); the sampler with %d",
                 info.rank, cfg.seed + info.rank, cfg.seed)
    train_loader, val_loader, sampler = build.loaders(cfg, data, info, device)
    optimizer = build.optimizer(cfg, model)
    schedule = LRSchedule(optimizer, cfg.schedule, cfg.peak_lr, len(train_loader), cfg.epochs,
                          cfg.warmup_epochs, cfg.step_size, cfg.gamma, cfg.plateau_patience)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    progress, start = Progress(), 1
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise ConfigError(f"--resume {cfg.resume}: its weights do not fit {cfg.arch} with {len(labels)} "
                              "classes; resume with the same arch, network and data") from None
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state, device, info.rank)
        progress = Progress(list(state["history"]), dict(state["best"]), int(state["bad_epochs"]))
        start = int(state["epoch"]) + 1
        if start > cfg.epochs:
            raise ConfigError(
                f"--resume {cfg.resume} already ran {start - 1} epochs; pass --epochs above that"
            )
        if info.is_main:
            _carry_best_model(cfg, state)
    if info.is_main:
        log.info("data %s: %d train / %d val images, %d classes; %s with %s parameters on %s "
                 "(%d thread(s)%s)",
                 spec, len(data.train), len(data.val), len(labels), cfg.arch,
                 f"{sum(p.numel() for p in model.parameters()):,}", device, threads,
                 f", {info.world_size} processes" if info.enabled else "")
        if start > 1:
            log.info("resuming from %s at epoch %d", cfg.resume, start)
    out = Path(cfg.out)
    show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    meta_base = checkpoint_meta(cfg, spec, labels, pre, arch_config, data, val_digest)
    epoch = start - 1
    for epoch in range(start, cfg.epochs + 1):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(cfg.seed * 100_003 + epoch)  # the same order on resume
        bar = f"epoch {epoch}/{cfg.epochs}" if info.is_main and show_bar else None
        lr = schedule.lr
        stats = distributed.reduce_stats(train_one_epoch(
            net, train_loader, criterion, optimizer, schedule, device, scaler=scaler, grad_clip=cfg.grad_clip,
            amp=amp, channels_last=cfg.channels_last, progress=bar), device)
        # Evaluate the plain module, not the DDP wrapper: DDP's forward broadcasts buffers (a
        # collective), so ranks with unequal validation batches (fewer images than ranks: none)
        # would wait on each other forever. The replicas' buffers are identical after training.
        distributed.sync_buffers(model)
        result = distributed.reduce_eval(evaluate(
            model, val_loader, device, len(labels), amp=amp, channels_last=cfg.channels_last), device)
        schedule.epoch_end(result.accuracy)
        improved = progress.update(epoch, result)
        progress.history.append(_row(epoch, lr, stats, result))
        rank_rng = distributed.all_ranks(_rng_state(device))  # every rank's own streams, for a resume
        if info.is_main:
            _log_epoch(epoch, cfg.epochs, stats, result, lr, improved)
            summary = {"epochs": epoch, "best_epoch": progress.best["epoch"],
                       "best_val": {"top1": progress.best["acc"], "top5": progress.best["top5"],
                                    "loss": progress.best["loss"]},
                       "history": history_meta(progress.history, len(labels))}
            last = {"top1": result.accuracy, "top5": result.top5, "loss": result.loss}
            last_summary = {**summary, "checkpoint": "last", "val": last}
            save_serving(out / "last.safetensors", model, meta_base, last_summary)
            if improved:
                save_serving(out / "model.safetensors", model, meta_base, {**summary, "checkpoint": "best"})
            save_state(out / "train_state.pt", {
                "format": 1, "epoch": epoch, "config": cfg.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, **_rng_state(device),
                "rank_rng": rank_rng, "history": progress.history, "best": progress.best,
                "bad_epochs": progress.bad_epochs,
                "val_digest": val_digest})
            reports.write_history(out / "history.csv", progress.history)
        # every rank computed the same reduced metrics, so every rank stops at the same epoch
        if cfg.patience and progress.bad_epochs >= cfg.patience:
            if info.is_main:
                log.info("early stop: no better validation accuracy for %d epochs", progress.bad_epochs)
            break
    if info.enabled:
        # Every rank states its final weights; identical digests show DDP kept the replicas in step.
        log.info("rank %d final weights sha256 %s", info.rank, weights_sha256(model.state_dict()))
    if info.is_main:
        extra = {"checkpoint": str(out / "model.safetensors"), "arch": cfg.arch, "data": str(spec),
                 "split": "validation", "epoch": progress.best["epoch"], "skipped_files": len(data.skipped)}
        extra["calibration"] = finalize.finish(out, data, device, progress.history, amp=amp,
                                               batch_size=cfg.batch_size * 2, channels_last=cfg.channels_last)
        report = reports.write_all(out, progress.best_eval(), labels, extra, progress.history)
        log.info("best val accuracy %.4f (top-%d %.4f) at epoch %d; wrote %s: model.safetensors, "
                 "last.safetensors, train_state.pt, history.csv, loss.png, accuracy.png, "
                 "confusion_matrix.png, reliability.png, samples.png, report.json, report.md",
                 report["top1"], min(5, len(labels)), report["top5"], progress.best["epoch"], out)
    return FitResult(out, progress.best["acc"], progress.best["epoch"], epoch, model)


def _resumed_split(
    cfg: TrainConfig, state: dict[str, Any] | None, data: DataBundle, allow: bool, is_main: bool
) -> str | None:
    """The validation digest this run records: the one it started with. A resume whose data now splits
    differently would validate on images the model has trained on, so it is refused unless allowed;
    allowed, the first digest is kept, so `evaluate` on the new split still warns."""
    recorded = state.get("val_digest") if state is not None else None  # absent: older train_state.pt
    if state is None or recorded is None or recorded == data.val_digest:
        return data.val_digest
    message = split_changed(state.get("config") or {}, cfg)
    if not allow:
        raise ConfigError(f"--resume {cfg.resume}: {message}. Restore the data as it was when training "
                          "began, or pass --allow-split-change to resume anyway")
    if is_main:
        log.warning("--resume %s: %s (resuming anyway: --allow-split-change)", cfg.resume, message)
    return str(recorded)


def _carry_best_model(cfg: TrainConfig, state: dict[str, Any]) -> None:
    """Resuming into another --out: the restored best epoch's model.safetensors lies in the earlier
    run's folder, and is only rewritten here if a later epoch beats it. Copy it over first, so the new
    folder holds the best model its report.json and log name however the remaining epochs go."""
    out = Path(cfg.out)
    target = out / "model.safetensors"
    previous = Path((state.get("config") or {}).get("out") or out)
    if target.is_file() or previous.resolve() == out.resolve():
        return
    source = previous / "model.safetensors"
    if not source.is_file():
        raise ConfigError(
            f"--resume {cfg.resume} into --out {out}: the best model so far (epoch {state['best']['epoch']}) "
            f"should be {source}, which is missing; restore it, or resume into {previous}"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    log.info("copied the best model so far (epoch %d) from %s to %s", state["best"]["epoch"], source, target)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states a resume restores: the CPU's, and this process's CUDA device's when training on
    CUDA (dropout and other random ops on the GPU draw from it, not from the CPU generator). Not on
    CPU runs, where reading it would only start a CUDA context on a machine that has one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda}


def _restore_rng(state: dict[str, Any], device: torch.device, rank: int = 0) -> None:
    """Restore this rank's own streams: `rank_rng` holds one entry per rank (rank 0 writes the file
    but every rank's states were gathered into it). Older files hold rank 0's only."""
    ranks = state.get("rank_rng")
    own = ranks[rank] if ranks and rank < len(ranks) else state
    if own is state and rank > 0:
        log.warning("rank %d: the train state has no RNG state for this rank (written by an older "
                    "version or with fewer processes); it resumes with rank 0's", rank)
    torch.set_rng_state(own["rng"])
    cuda = own.get("cuda_rng")  # None from a CPU run; absent from states written before it was saved
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, list):  # written before per-rank states: every device of rank 0's process
        if device.index is not None and device.index < len(cuda):
            torch.cuda.set_rng_state(cuda[device.index], device)
        return
    torch.cuda.set_rng_state(cuda, device)


def _row(epoch: int, lr: float, stats: EpochStats, result: EvalResult) -> dict[str, Any]:
    return {"epoch": epoch, "lr": lr, "train_loss": stats.loss, "train_acc": stats.accuracy,
            "val_loss": result.loss, "val_acc": result.accuracy, "val_top5": result.top5,
            "seconds": stats.seconds + result.seconds}


def _log_epoch(epoch: int, epochs: int, stats: EpochStats, result: EvalResult, lr: float, best: bool) -> None:
    k = min(5, result.confusion.shape[0])
    log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f top-%d %.4f | lr %.2g | %.1fs%s",
             epoch, epochs, stats.loss, stats.accuracy, result.loss, result.accuracy, k, result.top5, lr,
             stats.seconds + result.seconds, "  *best*" if best else "")
