"""The ONNX Runtime backend (CPU execution provider), `pip install 'convserve[onnx]'`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.onnx_file import INPUT_NAME, OUTPUT_NAME
from service.runtimes.base import require


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str) -> None:
        self.ort = require("onnxruntime", self.name)
        self.version: str = self.ort.__version__
        self.path = path
        self.precision = precision
        self.input_dtype = torch.float32
        self.model: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.folded_bn = False  # ONNX Runtime folds batch-norm itself; the export is folded already too
        # One session per intra-op thread count: the service switches between its batch and lone-image
        # thread counts per batch, and ORT fixes its pool when a session is made. warm-up makes each.
        self._sessions: dict[int, Any] = {}

    def session(self, threads: int) -> Any:
        s = self._sessions.get(threads)
        if s is None:
            ort = self.ort
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # No spin-waiting between runs (like OMP_WAIT_POLICY=PASSIVE for torch): the cores are
            # shared with the decode threads.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # No arena: it keeps the largest batch's activations for the life of the session (resnet18,
            # batch 16: ~60 MiB per session, one session per thread count), where freed blocks go back
            # to the heap and malloc_trim returns them; batch 1 and 16 ran no slower without (Zen 3).
            opts.enable_cpu_mem_arena = False
            s = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self._sessions[threads] = s
        return s

    def run(self, x: torch.Tensor) -> torch.Tensor:
        s = self.session(torch.get_num_threads())
        out = s.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def describe(self) -> dict[str, Any]:
        return {"onnx_file": str(self.path), "providers": ["CPUExecutionProvider"]}
