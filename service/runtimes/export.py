"""The exported graph for an ONNX backend, derived from the checkpoint and cached beside it.

The cache is never a second source of truth: each file records what it was made from
(`convserve.cache_key`: the checkpoint's SHA-256, the runtime and its version, torch, the opset, batch-norm
folding) and is re-exported whenever any of that differs. It lives beside the checkpoint
(`model.safetensors.onnxruntime.onnx`) so that a replica's volume carries it; a read-only
checkpoint folder falls back to --export-cache-dir, else a folder in the system temp dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, Loaded
from model.onnx_file import OPSET, export_onnx, read_props, reference_probs, set_metadata
from service.optimize import fold_batchnorm

log = logging.getLogger(__name__)
KEY_PROP = "convserve.cache_key"
CACHE_FORMAT = 1


def cache_key(sha256: str, runtime: str, version: str, fold_bn: bool) -> str:
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "source_sha256": sha256,
            "runtime": runtime,
            "runtime_version": version,
            "torch": torch.__version__,
            "opset": OPSET,
            "fold_batchnorm": fold_bn,
        },
        sort_keys=True,
    )


def cache_paths(checkpoint: Path, sha256: str, suffix: str, cache_dir: Path | None) -> list[Path]:
    """Where to look for a file derived from the checkpoint (`suffix`: `onnxruntime.onnx`), in order:
    beside the checkpoint, then the fallback folder."""
    fallback = cache_dir or Path(tempfile.gettempdir()) / "convserve-export-cache"
    return [
        checkpoint.with_name(f"{checkpoint.name}.{suffix}"),
        fallback / f"{checkpoint.stem}-{sha256[:16]}.{suffix}",
    ]


def write_first(candidates: list[Path], data: bytes) -> Path:
    """Write `data` to the first of `candidates` that can be written, atomically (readers, another
    replica among them, never see half a file); raises CheckpointError naming every failure."""
    errors = []
    for path in candidates:
        # per process and thread: a reload and a first start's trial may export the same file at once
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            errors.append(f"{path}: {e.strerror}")
            with contextlib.suppress(OSError):  # e.g. its folder is a file: nothing was written
                tmp.unlink(missing_ok=True)
            continue
        return path
    where = "; ".join(errors)
    raise CheckpointError(f"cannot write {candidates[0].name} anywhere ({where}); set --export-cache-dir")


def _matches(path: Path, key: str) -> bool:
    try:
        return path.is_file() and read_props(path).get(KEY_PROP) == key
    except CheckpointError:  # a damaged cache file is rebuilt, not fatal
        return False


def exported_onnx(
    loaded: Loaded, sha256: str, runtime: str, version: str, fold_bn: bool, cache_dir: Path | None,
    folded: torch.nn.Module | None = None,
) -> Path:
    """The path of an ONNX file for `loaded`, exported now unless a matching cache entry exists.
    `folded`: the same model with batch-norm already folded (the torch runtime's, under --runtime
    auto), so it is not folded twice (0.4 s of resnet18's first start on the Zen 3)."""
    key = cache_key(sha256, runtime, version, fold_bn)
    candidates = cache_paths(loaded.path, sha256, f"{runtime}.onnx", cache_dir)
    for path in candidates:
        if _matches(path, key):
            log.info("export cache hit: %s", path)
            return path
    start = time.perf_counter()
    model = loaded.model
    if fold_bn and folded is not None:
        model = folded
    elif fold_bn:  # the same folding (and its probe check) as the torch runtime
        model, _ = fold_batchnorm(model, loaded.preprocess.input_shape)
    data = export_onnx(model, loaded.preprocess.input_shape)
    probe = reference_probs(loaded.model, loaded.preprocess).tolist()
    extra = {
        KEY_PROP: key,
        "convserve.precision": "fp32",
        "convserve.source_sha256": sha256,
        "convserve.probe": json.dumps(probe),
    }
    data = set_metadata(data, loaded.meta, extra)
    path = write_first(candidates, data)
    took = time.perf_counter() - start
    log.info("exported %s for %s in %.2fs -> %s", loaded.path.name, runtime, took, path)
    return path
