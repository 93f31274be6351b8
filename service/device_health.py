"""Telling a failed device from a failed batch.

Most exceptions from a batch are the batch's own (a model bug on one input, an out-of-memory on a
large batch): that batch answers 500 and the next one runs. A CUDA error such as an illegal memory
access is different: the CUDA context is poisoned ("sticky"), every later kernel fails too, and only
a new process recovers. Such a replica must fail liveness and readiness so the orchestrator replaces
it, instead of answering 500 to every request while its probes stay green.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# What CUDA, cuBLAS and cuDNN errors look like once torch has turned them into a RuntimeError
# (torch.AcceleratorError, its own class since torch 2.8, is matched by type first).
_DEVICE_ERROR_MARKERS = (
    "CUDA error",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
    "device-side assert",
    "an illegal memory access",
    "unspecified launch failure",
)


def probe(device: torch.device) -> None:
    """A tiny kernel and a wait for it: raises if the device can no longer run anything."""
    x = torch.ones(16, device=device)
    (x * 2).sum().item()
    torch.cuda.synchronize(device)


def device_failure(
    exc: BaseException, device: torch.device, check: Callable[[torch.device], None] = probe
) -> str | None:
    """Why `device` is unusable after `exc`, or None when the failure belongs to the batch alone.

    A CUDA error (by type or message) fails the device. Any other exception on a CUDA device
    (an out-of-memory included: usually transient) is followed by a probe on the device; a probe that
    fails proves the device gone. On the CPU an exception is always the batch's own."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    out_of_memory = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)
    if not out_of_memory:
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return f"{type(exc).__name__}: {exc}"
        if any(marker in str(exc) for marker in _DEVICE_ERROR_MARKERS):
            return f"{type(exc).__name__}: {exc}"
    if device.type != "cuda":
        return None
    try:
        check(device)
    except Exception as e:  # the device cannot run a 16-element multiply: it has failed
        return f"{type(exc).__name__}: {exc}; a probe on {device} afterwards failed too: {e}"
    return None
