"""The CUDA decisions of training, on a CPU: device per rank, set_device, init_process_group's
device_id, pin_memory and per-rank RNG restore. CUDA's neighbours are faked (device count,
set_device, init_process_group, the CUDA RNG setters); the real thing runs in tests/cuda/."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import model.device
from training import build, distributed, fit
from training.distributed import Dist

from .conftest import tiny_config


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> dict[str, list[Any]]:
    calls: dict[str, list[Any]] = {"set_device": [], "init": []}
    monkeypatch.setattr(model.device, "cuda_device_count", lambda: count)
    monkeypatch.setattr(distributed, "cuda_device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls["init"].append((backend, kw)))
    return calls


def _ranks(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, local: int) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local),
                        ("LOCAL_WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))


def test_every_gpu_visible_uses_the_local_rank_and_binds_nccl_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _gpus(monkeypatch, 4)
    _ranks(monkeypatch, rank=3, world=4, local=3)
    _, device = distributed.setup("auto")
    assert device == torch.device("cuda", 3)
    assert calls["set_device"] == [torch.device("cuda", 3)]
    ((backend, kw),) = calls["init"]
    assert backend == "nccl" and kw["device_id"] == torch.device("cuda", 3)
    assert kw["rank"] == 3 and kw["world_size"] == 4


def test_one_visible_gpu_per_rank_uses_cuda0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes / SLURM give each rank its own GPU as device 0: cuda:LOCAL_RANK does not exist."""
    calls = _gpus(monkeypatch, 1)
    _ranks(monkeypatch, rank=1, world=2, local=1)
    _, device = distributed.setup("cuda")
    assert device == torch.device("cuda", 0)
    assert calls["init"][0][1]["device_id"] == torch.device("cuda", 0)


def test_fewer_gpus_than_local_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    _ranks(monkeypatch, rank=2, world=3, local=2)
    with pytest.raises(ValueError, match="local rank 2 has no GPU of its own: 2 CUDA device"):
        distributed.setup("auto")


def test_single_process_cuda1_sets_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _gpus(monkeypatch, 2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info, device = distributed.setup("cuda:1")
    assert not info.enabled and device == torch.device("cuda", 1)
    assert calls["set_device"] == [torch.device("cuda", 1)]  # never called before: cuda:0 got a context
    assert calls["init"] == []


def test_gloo_on_the_cpu_gets_no_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _gpus(monkeypatch, 0)
    _ranks(monkeypatch, rank=0, world=2, local=0)
    distributed.setup("cpu")
    assert calls["init"] == [("gloo", {"rank": 0, "world_size": 2, "device_id": None})]
    assert calls["set_device"] == []


def test_pin_memory_only_for_a_cuda_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    xs = TensorDataset(torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))
    data: Any = SimpleNamespace(train=xs, val=xs, in_memory=True)
    cfg = tiny_config(tmp_path, workers=0)
    train, val, _ = build.loaders(cfg, data, Dist(), torch.device("cpu"))
    assert not train.pin_memory and not val.pin_memory  # --device cpu on a GPU host pins nothing
    train, val, _ = build.loaders(cfg, data, Dist(), torch.device("cuda", 0))
    assert train.pin_memory and val.pin_memory


def test_resume_restores_each_ranks_own_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(10)
    rank0 = {"rng": torch.get_rng_state(), "cuda_rng": torch.tensor([0], dtype=torch.uint8)}
    torch.manual_seed(11)
    rank1 = {"rng": torch.get_rng_state(), "cuda_rng": torch.tensor([1], dtype=torch.uint8)}
    state = {**rank0, "rank_rng": [rank0, rank1]}  # rank 0 wrote the file, with everyone's states
    restored: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("rank 0's for all"))
    torch.manual_seed(99)
    fit._restore_rng(state, torch.device("cuda", 0), rank=1)
    assert torch.equal(torch.get_rng_state(), rank1["rng"])
    ((cuda_state, device),) = restored
    assert torch.equal(cuda_state, rank1["cuda_rng"]) and device == torch.device("cuda", 0)
    fit._restore_rng(state, torch.device("cpu"), rank=0)
    assert torch.equal(torch.get_rng_state(), rank0["rng"])
