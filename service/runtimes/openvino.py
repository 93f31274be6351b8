"""The OpenVINO backend (CPU plugin), `pip install 'convserve[openvino]'`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.runtimes.base import require


class OpenVinoRuntime:
    name = "openvino"

    def __init__(self, path: Path, precision: str) -> None:
        self.ov = require("openvino", self.name)
        self.version: str = self.ov.get_version()
        self.path = path
        self.precision = precision
        self.input_dtype = torch.float32
        self.model: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.folded_bn = False
        self._core = self.ov.Core()
        self._graph = self._core.read_model(str(path))  # reads the ONNX file directly
        self._requests: dict[int, Any] = {}  # one compiled model per thread count, as for ONNX Runtime

    def request(self, threads: int) -> Any:
        r = self._requests.get(threads)
        if r is None:
            config = {
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": 1,  # the batcher sends one batch at a time
                "PERFORMANCE_HINT": "LATENCY",
                # OpenVINO picks bf16 by itself on CPUs with bf16 units: fp32 means fp32 here (int8
                # layers of a quantized graph stay int8).
                "INFERENCE_PRECISION_HINT": "f32",
                "ENABLE_CPU_PINNING": False,  # the cores are shared with the decode threads
            }
            r = self._core.compile_model(self._graph, "CPU", config).create_infer_request()
            self._requests[threads] = r
        return r

    def run(self, x: torch.Tensor) -> torch.Tensor:
        r = self.request(torch.get_num_threads())
        r.infer({0: x.contiguous().numpy()})
        return torch.from_numpy(r.get_output_tensor(0).data.copy())  # the request reuses its buffer

    def release_memory(self) -> None:
        """Nothing to shrink from here: each infer request keeps its own output buffers."""

    def describe(self) -> dict[str, Any]:
        return {"onnx_file": str(self.path), "plugin": "CPU"}
