"""What every runtime offers the predictor, the missing-extra error, and the probe check.

A runtime runs a normalised batch and returns logits; everything around it (decoding, batching,
thread choice, warm-up, softmax, top-k, metrics) stays in the predictor and the service, so it is
the same for every backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import torch

from model.checkpoint import CheckpointError

# The pip extra that installs each optional runtime's packages.
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
# Largest probability difference a backend may show against the torch fp32 model on the probe batch.
# Both ONNX backends matched torch to ~1e-6 in the logits on our convnets, resnet18 and
# mobilenet_v3_small (fp32, measured here); 1e-4 is FOLD_TOLERANCE, the bar batch-norm folding meets.
FP32_TOLERANCE = 1e-4
# int8 is not meant to match exactly: the check guards against a broken graph (wrong layout, wrong
# scales), not against rounding. An int8 file's probe is a few of its real calibration images: the
# trained default and digits models differ from fp32 there by at most 5e-4 (both backends, measured);
# on random-noise images, which no calibration range covered, the same files drifted up to 0.24.
INT8_TOLERANCE = 0.05


class RuntimeUnavailable(ValueError):
    """The chosen runtime's packages are not installed (or it cannot run this device/precision)."""


class Runtime(Protocol):
    name: str  # torch, onnxruntime, openvino
    version: str  # of the runtime package: part of the export cache key
    precision: str  # what the arithmetic runs in: fp32, bf16, fp16, int8
    input_dtype: torch.dtype  # what run() expects
    model: Callable[[torch.Tensor], torch.Tensor] | None  # the torch callable (torch runtime only)
    folded_bn: bool

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised input on the device -> (B, classes) logits."""
        ...

    def release_memory(self) -> None:
        """Give back what the runtime keeps for reuse between batches (inference thread, idle)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Keys merged into GET /v1/model."""
        ...


def require(module: str, runtime: str) -> ModuleType:
    """Import an optional runtime's package, or raise the one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeUnavailable(
            f"--runtime {runtime} needs the {module} package, which is not installed ({e.msg}): "
            f"pip install 'convserve[{EXTRAS[runtime]}]'"
        ) from None


def check_probe(
    runtime: Runtime, probe: torch.Tensor, want: torch.Tensor, tolerance: float, labels: list[str], what: str
) -> float:
    """Run the probe batch through `runtime` and compare its probabilities with `want` (the torch
    fp32 model's); returns the largest difference, or raises CheckpointError naming where it is."""
    got = runtime.run(probe).float().softmax(dim=-1)
    if got.shape != want.shape:
        raise CheckpointError(
            f"{what}: {runtime.name} returns shape {tuple(got.shape)}, the torch model {tuple(want.shape)}"
        )
    diff = (got - want).abs()
    worst = float(diff.max())
    if not worst <= tolerance:  # also catches NaN
        row, col = divmod(int(torch.nan_to_num(diff, nan=float("inf")).argmax()), diff.shape[1])
        raise CheckpointError(
            f"{what}: {runtime.name} ({runtime.precision}) differs from the torch model on the probe batch "
            f"by {worst:.3g} in probability (image {row}, class {labels[col]!r}: {float(got[row, col]):.4f} "
            f"vs {float(want[row, col]):.4f}); the tolerance is {tolerance:g}"
        )
    return worst
