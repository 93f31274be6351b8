"""Backends behind one small interface (base.Runtime): torch, onnxruntime, openvino.

`load_source` tells a checkpoint from an ONNX file (the one place that dispatches on file type) and
`build_runtime` makes the backend the predictor calls. For an ONNX backend a checkpoint is exported
(or taken from the export cache) and every backend's output is checked on a probe batch against the
torch fp32 model before the service may become ready.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

# `as tt`: importing the submodule service.runtimes.torch binds the name `torch` in this package.
import torch as tt

from model.checkpoint import CheckpointError, Loaded, load_checkpoint, read_meta
from model.onnx_file import OnnxArtifact, is_onnx, probe_batch, read_onnx_artifact, reference_probs
from service.lean_imports import defer_dynamo
from service.runtimes.base import (
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    Runtime,
    RuntimeUnavailable,
    check_probe,
    require,
)
from service.runtimes.torch import TorchRuntime

__all__ = ["Runtime", "RuntimeUnavailable", "build_runtime", "check_installed", "load_source", "preflight"]
log = logging.getLogger(__name__)
RuntimeName = Literal["torch", "onnxruntime", "openvino"]
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
Source = Loaded | OnnxArtifact


def check_installed(runtime: str) -> None:
    """Raise RuntimeUnavailable (one line, naming the pip extra) unless `runtime` can be imported.
    The ONNX backends also need `onnx` to export a checkpoint: looked up, not imported (6 MiB of
    idle RSS a start that finds its export cached does not need)."""
    if runtime in _MODULES:
        require(_MODULES[runtime], runtime)
        if importlib.util.find_spec("onnx") is None:
            require("onnx", runtime)  # raises, naming the extra


def preflight(path: Path, runtime: str) -> None:
    """The cheap start-up check of `python -m service`: runtime installed, file header readable."""
    if runtime == "auto" and is_onnx(path):  # an ONNX file runs on onnxruntime (runtime_choice.py)
        runtime = "onnxruntime"
    check_installed(runtime)
    if is_onnx(path):
        if runtime == "torch":
            raise CheckpointError(f"{path} is an ONNX file: serve it with --runtime onnxruntime/openvino")
        read_onnx_artifact(path)
    else:
        read_meta(path)


def load_source(path: Path) -> Source:
    if is_onnx(path):
        return read_onnx_artifact(path)
    with defer_dynamo():  # a torchvision architecture would import torch._dynamo: 2.5 s, 171 MiB
        return load_checkpoint(path)


def build_runtime(
    runtime: str,
    source: Source,
    device: tt.device,
    *,
    sha256: str,
    precision: str = "fp32",
    channels_last: str = "auto",
    compile: str = "off",
    fold_bn: bool = True,
    cache_dir: Path | None = None,
    folded: tt.nn.Module | None = None,
) -> Runtime:
    if runtime == "torch":
        if isinstance(source, OnnxArtifact):
            raise CheckpointError(f"{source.path} is an ONNX file: use --runtime onnxruntime/openvino")
        return TorchRuntime(source, device, precision=precision, channels_last=channels_last,
                            compile=compile, fold_bn=fold_bn)
    if runtime not in _MODULES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; choose torch, onnxruntime or openvino")
    check_installed(runtime)
    if device.type != "cpu":
        raise RuntimeUnavailable(
            f"--runtime {runtime} runs on the CPU; use --device cpu, or --runtime torch on CUDA"
        )
    if precision != "fp32":
        raise RuntimeUnavailable(
            f"--precision {precision} is for --runtime torch; {runtime} runs fp32, or int8 from a "
            "quantized file (python -m training quantize)"
        )
    from service.runtimes.export import exported_onnx

    pre, labels = source.preprocess, list(source.meta.labels)
    if isinstance(source, OnnxArtifact):
        path, precision = source.path, source.precision
        if source.probe is None:
            raise CheckpointError(f"{path} carries no probe reference (convserve.probe); re-export it")
        want, probe = tt.tensor(source.probe), source.probe_input()
        tolerance = INT8_TOLERANCE if precision == "int8" else FP32_TOLERANCE
    else:
        version = _version(runtime)
        path = exported_onnx(source, sha256, runtime, version, fold_bn, cache_dir, folded)
        want, tolerance, probe = reference_probs(source.model, pre), FP32_TOLERANCE, probe_batch(pre)
    rt: Runtime
    if runtime == "onnxruntime":
        from service.runtimes.onnxruntime import OnnxRuntime

        rt = OnnxRuntime(path, precision)
    else:
        from service.runtimes.openvino import OpenVinoRuntime

        rt = OpenVinoRuntime(path, precision)
    with tt.inference_mode():
        worst = check_probe(rt, probe, want, tolerance, labels, str(source.path))
    log.info("%s %s (%s) matches the torch model on the probe batch: max prob. diff %.2g (tolerance %g)",
             rt.name, rt.version, rt.precision, worst, tolerance)
    return rt


def _version(runtime: str) -> str:
    if runtime == "onnxruntime":
        return str(require("onnxruntime", runtime).__version__)
    return str(require("openvino", runtime).get_version())
