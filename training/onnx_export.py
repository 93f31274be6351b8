"""`export --format onnx` and `quantize`: standalone ONNX files made from a checkpoint.

Both carry the checkpoint's labels and preprocessing in their metadata (model/onnx_file.py), a
reference to the checkpoint they came from (its SHA-256) and the torch fp32 model's probabilities
on a probe batch, so `python -m service --checkpoint F.onnx --runtime onnxruntime|openvino` serves
them like a checkpoint and checks them before it becomes ready.

int8: ONNX Runtime's post-training static quantization, QDQ format, int8 weights per output channel
and uint8 activations (U8S8: the VNNI instructions' operand types on x86), MinMax calibration on
images of the training split under the evaluation transform (what the service feeds the model).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from model.checkpoint import Loaded, file_sha256, load_checkpoint
from model.onnx_file import (
    INPUT_NAME,
    OUTPUT_NAME,
    PROBE_SIZE,
    artifact_props,
    export_onnx,
    set_metadata,
)
from model.preprocess import Preprocess
from training.config import ConfigError, TrainConfig
from training.data import DataSpec, Sample, load_data

log = logging.getLogger(__name__)


def _write(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


def export_checkpoint_onnx(checkpoint: Path, out: Path) -> dict[str, Any]:
    """The checkpoint's model as fp32 ONNX (dynamic batch axis), its metadata in metadata_props.
    Batch-norm stays as trained: every ONNX runtime folds it into the convolutions itself."""
    loaded = load_checkpoint(checkpoint)
    pre = loaded.preprocess
    data = export_onnx(loaded.model, pre.input_shape)
    sha = file_sha256(checkpoint)
    _write(out, set_metadata(data, loaded.meta, artifact_props(sha, "fp32", loaded.model, pre)))
    return {
        "wrote": str(out),
        "format": "onnx",
        "precision": "fp32",
        "source_sha256": sha,
        "input": [INPUT_NAME, "batch", *pre.input_shape],
        "output": [OUTPUT_NAME, "batch", len(loaded.meta.labels)],
    }


def _data_config(meta_training: dict[str, Any], data: str | None) -> tuple[str, TrainConfig]:
    recorded = meta_training.get("data")
    data = data or recorded
    if not data:
        raise ConfigError("the checkpoint does not record its data set; pass --data")
    args = (meta_training.get("data_args") or {}) if data == recorded else {}
    return data, TrainConfig(data=data, **args).validate()


class CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol: get_next() -> {input: batch} or None."""

    def __init__(self, images: Dataset[Sample], batch_size: int) -> None:
        self._batches = iter(DataLoader(images, batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[0].numpy()}


def top1_predictions(
    fn: Any, val: Dataset[Sample], mapping: list[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true class indices (checkpoint label order) over `val`; fn maps a float batch
    to logits or probabilities."""
    preds, targets = [], []
    for x, y in DataLoader(val, 128):
        preds.append(np.asarray(fn(x)).argmax(axis=1))
        targets.append(np.asarray([mapping[t] for t in y.tolist()] if mapping else y.numpy()))
    return np.concatenate(preds), np.concatenate(targets)


def quantize_graph(model: torch.nn.Module, input_shape: tuple[int, int, int], reader: Any) -> bytes:
    """The fp32 export of `model`, statically quantized to int8 with the batches `reader` yields."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(export_onnx(model, input_shape))
        quant_pre_process(str(fp32), str(prepared))  # shape inference + graph fusions (Conv+BN) first
        quantize_static(
            str(prepared), str(int8), reader,
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return int8.read_bytes()


class BatchReader:
    """A CalibrationDataReader over ready (B, C, H, W) float32 batches."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.numpy()}


def uint8_image(images: Any, i: int, pre: Preprocess) -> torch.Tensor:
    """Training image i as uint8 after the eval geometry (CachedImages keeps it; else re-quantize)."""
    pixels = getattr(images, "pixels", None)
    if pixels is not None:
        return torch.as_tensor(pixels[i])
    x, _ = images[i]  # a normalised float image (folder data): undo the normalisation
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    return (x * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


@dataclass
class QuantizeData:
    """What a quantizer calibrates on and is judged on: the checkpoint's own data set (training split
    under the evaluation transform, `picked` the calibration images) and its validation split."""

    loaded: Loaded
    data: str
    train: Dataset[Sample]
    val: Dataset[Sample]
    mapping: list[int] | None  # data set class index -> checkpoint label index, when they differ
    picked: list[int]

    def calibration(self) -> Dataset[Sample]:
        return Subset(self.train, self.picked)


def quantize_data(checkpoint: Path, data: str | None, calibration_images: int, seed: int = 0) -> QuantizeData:
    """The calibration images (`calibration_images` of the training split, drawn with `seed`) and the
    validation split of the checkpoint's data set (or `data`), as `quantize` uses them."""
    if calibration_images < 1:
        raise ConfigError("--calibration-images must be at least 1")
    loaded = load_checkpoint(checkpoint)
    meta, pre = loaded.meta, loaded.preprocess
    data, cfg = _data_config(meta.training, data)
    bundle = load_data(DataSpec.parse(data), pre, None, cfg, train=True)  # eval transform, no augmentation
    assert bundle.train is not None
    missing = [label for label in bundle.labels if label not in meta.labels]
    if missing:
        raise ConfigError(f"data classes {missing} are not among the checkpoint's labels {meta.labels}")
    mapping = None if bundle.labels == meta.labels else [meta.labels.index(x) for x in bundle.labels]
    g = torch.Generator().manual_seed(seed)
    n = min(calibration_images, len(bundle.train))  # type: ignore[arg-type]
    picked = torch.randperm(len(bundle.train), generator=g)[:n].tolist()  # type: ignore[arg-type]
    return QuantizeData(loaded, data, bundle.train, bundle.val, mapping, picked)


def run_quantize(
    checkpoint: Path, data: str | None, calibration_images: int, out: Path, seed: int = 0
) -> dict[str, Any]:
    """Write an int8 ONNX file and return the fp32 vs int8 validation comparison."""
    import onnxruntime as ort

    qd = quantize_data(checkpoint, data, calibration_images, seed)
    loaded, data, mapping, picked = qd.loaded, qd.data, qd.mapping, qd.picked
    meta, pre = loaded.meta, loaded.preprocess
    n = len(picked)
    start = time.perf_counter()
    graph = quantize_graph(loaded.model, pre.input_shape, CalibrationReader(qd.calibration(), 32))
    took = time.perf_counter() - start
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        fp32_pred, targets = top1_predictions(lambda x: loaded.model(x), qd.val, mapping)
    int8_pred, _ = top1_predictions(
        lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0], qd.val, mapping
    )
    report = {
        "wrote": str(out),
        "tool": f"onnxruntime {ort.__version__} quantize_static (QDQ, per-channel int8 weights, "
        "uint8 activations, MinMax)",
        "calibration_images": n,
        "calibration_data": f"{data} (training split)",
        "validation_images": len(targets),
        "val_top1_fp32": float((fp32_pred == targets).mean()),
        "val_top1_int8": float((int8_pred == targets).mean()),
        "agreement_with_fp32": float((fp32_pred == int8_pred).mean()),
        "seconds": round(took, 2),
    }
    report["drop_points"] = round(100 * (report["val_top1_fp32"] - report["val_top1_int8"]), 3)
    sha = file_sha256(checkpoint)
    # a few real calibration images as the probe: the service checks the int8 graph on them
    probe_images = torch.stack([uint8_image(qd.train, i, pre) for i in picked[:PROBE_SIZE]])
    props = artifact_props(sha, "int8", loaded.model, pre, probe_images)
    props["convserve.quantization"] = json.dumps({k: v for k, v in report.items() if k != "wrote"})
    _write(out, set_metadata(graph, meta, props))
    return report
