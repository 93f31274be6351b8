"""The ONNX Runtime backend (CPU execution provider), `pip install 'convserve[onnx]'`.

Memory: every session of the process allocates from one arena that ONNX Runtime's environment owns
(`_shared_arena`), grown by exactly what is asked (no powers of two). Without an arena each tensor was
malloc'd and freed per batch, and batches of varying sizes left glibc's arena of the inference thread
fragmented: a 20,000-request soak of the default convnet held ~60 MiB of freed heap under load (Zen
4; docs/benchmarks.md), where the shared arena reuses its blocks best-fit and holds the largest
batch's tensors once. `release_memory` shrinks it when the service is idle, so what it holds goes
back (service/memory.py) and the idle RSS is what it was without.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.onnx_file import INPUT_NAME, OUTPUT_NAME
from service.runtimes.base import require

_ARENA_REGISTERED = False  # one per process (ONNX Runtime's environment is a singleton)
_ARENA_LOCK = threading.Lock()  # a candidate or a reload builds its sessions off the inference thread


def _shared_arena(ort: Any) -> None:
    global _ARENA_REGISTERED
    with _ARENA_LOCK:
        if _ARENA_REGISTERED:
            return
        cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # kSameAsRequested: no rounding up to 2^k
        where = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(where, cfg)
        _ARENA_REGISTERED = True


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
        self._shrink = self.ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

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
            # The process's shared arena (module docstring), not one per session: a session's own
            # arena keeps the largest batch's tensors for its life (resnet18, batch 16: ~60 MiB per
            # session, one session per thread count) and can only be shrunk run by run.
            _shared_arena(ort)
            opts.enable_cpu_mem_arena = True
            opts.add_session_config_entry("session.use_env_allocators", "1")
            # Each tensor its own best-fit block of the arena: a memory pattern is one block per input
            # shape, and with batches of every size from 1 to the maximum those blocks fragmented the
            # arena (the convnet soak under load: +25-30 MiB with, +17-25 without, 3 runs; no slower).
            opts.enable_mem_pattern = False
            s = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self._sessions[threads] = s
        return s

    def run(self, x: torch.Tensor) -> torch.Tensor:
        s = self.session(torch.get_num_threads())
        out = s.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def release_memory(self) -> None:
        """Shrink the shared arena to what is in use (inference thread, between batches): ONNX Runtime
        shrinks only at the end of a run that asks, so this runs one blank image."""
        if not self._sessions:
            return
        s = next(iter(self._sessions.values()))
        shape = [1, *(d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape[1:])]
        s.run([OUTPUT_NAME], {INPUT_NAME: torch.zeros(shape, dtype=self.input_dtype).numpy()}, self._shrink)

    def describe(self) -> dict[str, Any]:
        return {"onnx_file": str(self.path), "providers": ["CPUExecutionProvider"]}
