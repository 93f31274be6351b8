"""Device choice goes through one function; the CUDA branch is driven by faking the device count."""

from __future__ import annotations

import pytest
import torch

from model import device


def test_auto_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_device_count", lambda: 0)
    assert device.resolve_device("auto") == torch.device("cpu")
    assert device.resolve_device("cpu") == torch.device("cpu")


def test_auto_takes_the_first_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_device_count", lambda: 2)
    assert device.resolve_device("auto") == torch.device("cuda", 0)
    assert device.resolve_device("cuda") == torch.device("cuda", 0)
    assert device.resolve_device(" CUDA:1 ") == torch.device("cuda", 1)


def test_missing_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:1' requested but 1 CUDA device"):
        device.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        device.resolve_device("tpu")
