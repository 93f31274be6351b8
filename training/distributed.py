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

from model.device import cuda_device_count, resolve_device
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


def rank_device(info: Dist, requested_device: str) -> torch.device:
    """This process's device. Under torchrun on CUDA: cuda:LOCAL_RANK when every GPU of the node is
    visible to every rank; cuda:0 when each rank sees exactly one GPU (Kubernetes, SLURM and
    CUDA_VISIBLE_DEVICES per rank give each process "its" GPU as device 0). Fewer GPUs than local ranks
    otherwise is refused: two ranks on one GPU would deadlock NCCL or halve its memory unannounced."""
    device = resolve_device(requested_device)
    if not info.enabled or device.type != "cuda":
        return device
    count = cuda_device_count()
    if info.local_rank < count:
        return torch.device("cuda", info.local_rank)
    if count == 1:
        log.info("rank %d (local rank %d) sees one GPU: using cuda:0", info.rank, info.local_rank)
        return torch.device("cuda", 0)
    raise ValueError(
        f"local rank {info.local_rank} has no GPU of its own: {count} CUDA device(s) visible; start at "
        "most that many processes per node, or give each rank one GPU (CUDA_VISIBLE_DEVICES)"
    )


def setup(requested_device: str) -> tuple[Dist, torch.device]:
    """Pick this process's device (via model.device, the one place that decides) and join the group."""
    info = from_env()
    device = rank_device(info, requested_device)
    if device.type == "cuda":
        # cuda:N becomes the current device too: kernels, NCCL and the caching allocator would
        # otherwise start a context on cuda:0 (single-process --device cuda:1 included).
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds the NCCL communicator to this rank's GPU at once (no guessing, no hang on
        # a rank that picked the wrong device); gloo on the CPU takes none.
        dist.init_process_group(
            backend,
            rank=info.rank,
            world_size=info.world_size,
            device_id=device if device.type == "cuda" else None,
        )
        log.info("rank %d/%d joined the %s process group on %s", info.rank, info.world_size, backend, device)
    return info, device


def all_ranks(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a collective: every rank must call it); [obj] alone."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
