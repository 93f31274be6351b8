"""DistributedDataParallel under torchrun: process group, device per rank, reductions.

`torchrun --nproc_per_node=N -m training train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a single-process no-op. gloo on the CPU, nccl on CUDA. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.device import resolve_device
from training.engine import EpochStats, EvalResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Dist(
        int(env.get("RANK", "0")),
        world,
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def setup(requested_device: str) -> tuple[Dist, torch.device]:
    """Pick this process's device (via model.device, the one place that decides) and join the group."""
    info = from_env()
    device = resolve_device(requested_device)
    if info.enabled and device.type == "cuda":
        device = resolve_device(f"cuda:{info.local_rank}")  # one GPU per process
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
        log.info("rank %d/%d joined the %s process group on %s", info.rank, info.world_size, backend, device)
    return info, device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def set_threads(info: Dist, requested: int) -> int:
    """Split the cores between the processes on this machine: oversubscribed OpenMP threads spin
    against each other and run slower than fewer threads."""
    threads = requested or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    return threads


def _sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_stats(stats: EpochStats, device: torch.device) -> EpochStats:
    if not dist.is_initialized():
        return stats
    loss_sum, correct, count = _sum([stats.loss_sum, stats.correct, stats.count], device)
    return EpochStats(loss_sum, int(correct), int(count), stats.seconds)


def reduce_eval(result: EvalResult, device: torch.device) -> EvalResult:
    """Each rank evaluated its own shard; the sums add up to the whole validation set exactly."""
    if not dist.is_initialized():
        return result
    confusion = result.confusion.to(device)
    dist.all_reduce(confusion)
    loss_sum, top5 = _sum([result.loss_sum, result.top5_correct], device)
    return EvalResult(confusion.cpu(), loss_sum, int(top5), result.seconds)


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision (e.g. stop early) for everyone, so no rank waits on a collective alone."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank, as DDP's own forward would.
    Called once by every rank before evaluating the plain module: evaluating through the DDP
    wrapper would broadcast per batch, and ranks with unequal validation shards would deadlock."""
    if not dist.is_initialized():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)
