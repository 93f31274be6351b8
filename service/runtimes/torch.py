"""The torch runtime: eager, bf16/fp16, TorchScript trace or torch.compile, as the service always ran."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from model.checkpoint import Loaded
from service.optimize import fold_batchnorm, optimise

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime:
    name = "torch"
    version = str(torch.__version__)

    def __init__(
        self,
        loaded: Loaded,
        device: torch.device,
        *,
        precision: str,
        channels_last: str,
        compile: str,
        fold_bn: bool,
    ) -> None:
        self.precision = precision
        self.input_dtype = DTYPES[precision]
        # channels_last measured faster for our CNNs on both oneDNN (CPU) and cuDNN (tensor cores).
        self.channels_last = channels_last != "off"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        c, h, w = loaded.preprocess.input_shape
        model: torch.nn.Module = loaded.model
        self.fold_diff: float | None = None
        if fold_bn:
            model, self.fold_diff = fold_batchnorm(model, (c, h, w))
        self.folded_bn = model is not loaded.model
        model = model.to(device=device, dtype=self.input_dtype)
        model = model.to(memory_format=fmt).eval()
        example = torch.zeros((1, c, h, w), dtype=self.input_dtype, device=device)
        example = example.contiguous(memory_format=fmt)
        self.model: Callable[[torch.Tensor], torch.Tensor] | None = optimise(model, compile, example)
        self._run = self.model
        self.compile = compile

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._run(x)

    def release_memory(self) -> None:
        """Nothing of its own: torch's CPU allocator frees to the heap (service/memory.trim returns it)."""

    def describe(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last, "compile": self.compile}
