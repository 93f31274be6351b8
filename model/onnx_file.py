"""ONNX files that describe themselves: export a torch model, and carry convserve's metadata.

Both sides use it: training writes standalone `.onnx` / `.int8.onnx` files for users who serve
elsewhere, and the service exports a checkpoint for its ONNX Runtime and OpenVINO backends. The
metadata lives in the ONNX `metadata_props` (string key -> string value), readable by any ONNX tool:

- `convserve`: the same JSON as a safetensors checkpoint's metadata (CheckpointMeta.to_json)
- `labels` / `preprocess`: the class names and preprocessing again, as plain JSON, for other servers
- `convserve.precision`: `fp32` or `int8`
- `convserve.source_sha256`: SHA-256 of the safetensors checkpoint the graph was made from
- `convserve.probe`: the fp32 torch model's probabilities on a probe batch (a start-up self-check):
  `probe_batch`'s random images, or for an int8 file a few real calibration images stored in
  `convserve.probe_images` (int8 may drift far on noise images that no training image resembles)
- `convserve.cache_key`: only in the service's export cache (what the export depended on)

`onnx` is an optional dependency (`pip install 'convserve[onnx]'`); this module reads and writes the
metadata without it, on the protobuf wire format.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import CheckpointError, CheckpointMeta
from model.preprocess import Preprocess

log = logging.getLogger(__name__)
ONNX_SUFFIX = ".onnx"
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
PROBE_SIZE = 3  # not the export's example batch (2): the check also proves the batch axis is dynamic


def is_onnx(path: Path) -> bool:
    """The one place that tells a file's kind: `.onnx` is an ONNX graph, anything else a checkpoint."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """(B, C, H, W) float32 -> (B, classes) logits, with a dynamic batch axis.

    The TorchScript-based exporter (dynamo=False): on our convnets, resnet18 and mobilenet_v3_small
    both exporters matched torch to ~1e-6, but it took 0.1-0.6 s against 2.6-6 s for the dynamo
    exporter (torch 2.14, measured here), and start-up pays for it. The dynamo exporter
    (onnxscript) is the fallback for a model the old one cannot trace."""
    model = model.float().eval()
    _skip_standard_reparse()
    example = torch.zeros((2, *input_shape))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notices of the exporter, not about this model
        try:
            torch.onnx.export(
                model, (example,), buf,  # type: ignore[arg-type]  # a file-like target works
                dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
            )
            return buf.getvalue()
        except Exception as e:
            log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", e)
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )
        if program is None:
            raise CheckpointError("the dynamo ONNX exporter returned nothing")
        tmp = io.BytesIO()
        program.save(tmp)  # type: ignore[arg-type]
        return tmp.getvalue()


_REPARSE_LOCK = threading.Lock()


def _skip_standard_reparse() -> None:
    """Teach torch's TorchScript exporter (once per process) to skip a pass that changes nothing here.

    At the end of every export it imports `onnx` and parses the whole graph to attach onnxscript
    functions for nodes of custom domains (`onnx_proto_utils._add_onnxscript_fn`, torch 2.14). A
    graph whose opset_import names only the standard domain has no such node, and the pass returns
    its bytes unchanged; but the `onnx` import (with protobuf and ml_dtypes) stays in the process: +6
    MiB of the service's RSS after a first start's export (Zen 4), of the 18 MiB the export leaves.
    Any other graph, or a torch without that function, goes through torch's pass as before."""
    try:
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils as utils
    except ImportError:
        return
    with _REPARSE_LOCK:
        original = getattr(utils, "_add_onnxscript_fn", None)
        if original is None or getattr(original, "convserve_skip", False):
            return

        def add_onnxscript_fn(model_bytes: bytes, custom_opsets: Mapping[str, int]) -> bytes:
            if not custom_opsets and set(opset_domains(model_bytes)) <= STANDARD_DOMAINS:
                return model_bytes
            return add_onnxscript_fn.__wrapped__(model_bytes, custom_opsets)  # type: ignore[attr-defined]

        add_onnxscript_fn.__wrapped__ = original  # type: ignore[attr-defined]  # torch's own pass
        add_onnxscript_fn.convserve_skip = True  # type: ignore[attr-defined]
        utils._add_onnxscript_fn = add_onnxscript_fn


STANDARD_DOMAINS = {"", "ai.onnx"}
OPSET_IMPORT_FIELD = 8  # ModelProto.opset_import: repeated OperatorSetIdProto {1: domain, 2: version}


def opset_domains(data: bytes) -> list[str]:
    """The operator-set domains a serialized ModelProto imports, read on the protobuf wire format."""
    out = []
    for num, wire, _, value, end in _top_level(io.BytesIO(data), len(data)):
        if num == OPSET_IMPORT_FIELD and wire == 2:
            entry = data[value:end]
            domain = ""  # proto3: an empty domain is not written
            for n, w, _, v, e in _top_level(io.BytesIO(entry), len(entry)):
                if n == 1 and w == 2:
                    domain = entry[v:e].decode()
            out.append(domain)
    return out


def probe_batch(pre: Preprocess, seed: int = 0) -> torch.Tensor:
    """A deterministic (PROBE_SIZE, C, H, W) float32 batch of normalised random uint8 images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (PROBE_SIZE, *pre.input_shape), generator=g, dtype=torch.uint8)
    return pre.normalize(images)


def reference_probs(model: nn.Module, pre: Preprocess, batch: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 torch model's probabilities on `batch` (normalised), by default `probe_batch`."""
    with torch.inference_mode():
        x = probe_batch(pre) if batch is None else batch
        return model.float().eval()(x).float().softmax(dim=-1)


def encode_images(images: torch.Tensor) -> str:
    """(N, C, H, W) uint8 -> JSON text for metadata_props."""
    raw = images.contiguous().numpy().tobytes()
    return json.dumps({"shape": list(images.shape), "uint8_base64": base64.b64encode(raw).decode()})


def decode_images(text: str) -> torch.Tensor:
    d = json.loads(text)
    flat = np.frombuffer(base64.b64decode(d["uint8_base64"]), dtype=np.uint8)
    return torch.from_numpy(flat.copy()).reshape(d["shape"])


@dataclass
class OnnxArtifact:
    """An ONNX file served directly (like Loaded for a checkpoint, without a torch model)."""

    meta: CheckpointMeta
    path: Path
    precision: str = "fp32"
    source_sha256: str = ""
    probe: list[list[float]] | None = None
    probe_images: torch.Tensor | None = None  # (N, C, H, W) uint8; None: probe_batch's
    props: dict[str, str] = field(default_factory=dict)
    model: None = None  # no torch module: the runtime runs the file

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.meta.preprocess)

    def probe_input(self) -> torch.Tensor:
        pre = self.preprocess
        return probe_batch(pre) if self.probe_images is None else pre.normalize(self.probe_images)


def set_metadata(data: bytes, meta: CheckpointMeta, extra: dict[str, str]) -> bytes:
    """`data` (a serialized ModelProto) with convserve's metadata_props set (an entry of the same key
    replaced) and producer_name "convserve". Written on the protobuf wire format, not through `onnx`:
    parsing and re-serialising a resnet18 graph took 0.43 s of the service's first start (Zen 3),
    where this copies the other fields' bytes as they are."""
    props = {
        "convserve": meta.to_json(),
        "labels": json.dumps(meta.labels),
        "preprocess": json.dumps(meta.preprocess, sort_keys=True),
        **extra,
    }
    out = bytearray()
    for num, wire, start, value, end in _top_level(io.BytesIO(data), len(data)):
        if num == PRODUCER_FIELD and wire == 2:
            continue  # set below (a protobuf parser keeps a scalar's last value; one is cleaner)
        if num == METADATA_FIELD and wire == 2 and _strings(data[value:end]).get(1, "") in props:
            continue
        out += data[start:end]
    out += _length_delimited(PRODUCER_FIELD, b"convserve")
    for key, text in props.items():
        entry = _length_delimited(1, key.encode()) + _length_delimited(2, text.encode())
        out += _length_delimited(METADATA_FIELD, entry)
    return bytes(out)


METADATA_FIELD = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}
PRODUCER_FIELD = 2  # ModelProto.producer_name


def read_props(path: Path) -> dict[str, str]:
    """The ModelProto's metadata_props, read from the protobuf wire format without `onnx`: the
    service reads them at every start (the export cache's key), where `onnx.load` parsed the whole
    graph and the `onnx` import cost 6 MiB of idle RSS. Only the top-level fields are walked; the
    graph (a length-delimited field) is skipped with a seek."""
    try:
        with open(path, "rb") as f:
            props: dict[str, str] = {}
            for num, wire, _, value, end in _top_level(f, f.seek(0, 2)):
                if num == METADATA_FIELD and wire == 2:
                    f.seek(value)
                    entry = _strings(f.read(end - value))
                    props[entry.get(1, "")] = entry.get(2, "")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable ONNX file (truncated or corrupt?): {e}") from None
    return props


def _top_level(f: io.BufferedIOBase | io.BytesIO, size: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, offset of the field's tag, of its value, of its end) for each field
    of the message in f[0:size]; a length-delimited value is seeked past, not read."""
    f.seek(0)
    while f.tell() < size:
        start = f.tell()
        field, wire = divmod(_varint(f), 8)
        if wire == 0:
            value = f.tell()
            _varint(f)
        elif wire in (1, 5):
            value = f.tell()
            f.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            n = _varint(f)
            value = f.tell()
            if value + n > size:
                raise ValueError(f"field {field} runs past the end of the file")
            f.seek(n, 1)
        else:
            raise ValueError(f"wire type {wire} of field {field}")
        end = f.tell()
        if end > size:
            raise ValueError("the last field runs past the end of the file")
        yield field, wire, start, value, end
        f.seek(end)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varint(f: io.BufferedIOBase | io.BytesIO) -> int:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError("truncated varint")
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _strings(data: bytes) -> dict[int, str]:
    """The length-delimited fields of a small message, as UTF-8 strings by field number."""
    f, out = io.BytesIO(data), {}
    while f.tell() < len(data):
        field, wire = divmod(_varint(f), 8)
        if wire != 2:
            raise ValueError(f"metadata entry field {field} has wire type {wire}")
        n = _varint(f)
        raw = f.read(n)
        if len(raw) != n:
            raise ValueError("truncated metadata entry")
        out[field] = raw.decode()
    return out


def read_onnx_artifact(path: Path) -> OnnxArtifact:
    """The metadata of a convserve ONNX file; raises CheckpointError naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no ONNX file at {path}")
    props = read_props(path)
    raw = props.get("convserve")
    if raw is None:
        raise CheckpointError(
            f"{path} is an ONNX file without convserve metadata (labels, preprocessing); write it with "
            "`python -m training export --format onnx` or `python -m training quantize`"
        )
    meta = CheckpointMeta.from_json(raw)
    probe = json.loads(props["convserve.probe"]) if "convserve.probe" in props else None
    images = decode_images(props["convserve.probe_images"]) if "convserve.probe_images" in props else None
    return OnnxArtifact(
        meta=meta,
        path=path,
        precision=props.get("convserve.precision", "fp32"),
        source_sha256=props.get("convserve.source_sha256", ""),
        probe=probe,
        probe_images=images,
        props=props,
    )


def artifact_props(
    source_sha256: str, precision: str, model: nn.Module, pre: Preprocess, images: torch.Tensor | None = None
) -> dict[str, str]:
    """Metadata of a standalone file: precision, source checkpoint and the probe reference, computed
    by the fp32 `model` on `images` ((N, C, H, W) uint8, stored too) or on `probe_batch`."""
    batch = None if images is None else pre.normalize(images)
    props = {
        "convserve.precision": precision,
        "convserve.source_sha256": source_sha256,
        "convserve.probe": json.dumps(reference_probs(model, pre, batch).tolist()),
    }
    if images is not None:
        props["convserve.probe_images"] = encode_images(images)
    return props
