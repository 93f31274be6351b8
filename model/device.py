"""The one place where training and serving choose a device.

Tests drive it by monkeypatching `cuda_device_count`, so the GPU branch is exercised on a CPU machine.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda:0 when a GPU is there, else cpu; 'cuda'/'cuda:N' must exist or we say so."""
    requested = requested.strip().lower()
    if not _DEVICE_RE.match(requested):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    count = cuda_device_count()
    if requested == "auto":
        device = torch.device("cuda:0" if count else "cpu")
        log.info("device auto -> %s (%d CUDA device(s) visible)", device, count)
        return device
    if requested == "cpu":
        return torch.device("cpu")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= count:
        raise ValueError(
            f"device {requested!r} requested but {count} CUDA device(s) are visible; "
            "use 'auto' or 'cpu', or check CUDA_VISIBLE_DEVICES and the NVIDIA driver"
        )
    return torch.device("cuda", index)


def set_tf32(enabled: bool) -> dict[str, bool]:
    """Decide TF32 explicitly for fp32 work on CUDA: cuDNN allows it for convolutions by default, so
    "fp32" on Ampere and later would silently run at TF32 precision. Process-wide; harmless on the
    CPU. Returns the flags as torch now holds them."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return tf32_state()


def tf32_state() -> dict[str, bool]:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
