"""The Open Inference Protocol (KServe v2) wire format over HTTP/REST: request body -> pipeline entries,
results -> response body. JSON and Triton's binary tensor data extension, both directions.

Nothing here knows FastAPI or the model: `parse_infer` raises only `ImageError` (400/413 codes of
service/errors.py) for anything wrong with the body, so a fuzzer can hold it to that, and a bad
element of a BYTES tensor becomes that element's own `ImageError` entry (the pipeline fails the
request naming it: the protocol has no per-item errors).

Inputs (exactly one per request): a BYTES tensor [N] or [N, 1] of encoded image files (raw bytes with
the binary extension; base64 text in JSON), or an FP32 tensor [N, C, H, W] already preprocessed the
checkpoint's way. Output: `probabilities` FP32 [N, classes], or with `parameters.classification = k`
a BYTES [N, k] tensor of "score:index:label" strings (Triton's classification extension).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.errors import ImageError
from service.inputs import Upload
from service.pipeline import Entry
from service.predictor import JobResult

OUTPUT = "probabilities"
IMAGE_INPUT, TENSOR_INPUT = "image", "input"  # the names advertised; any name is accepted
EXTENSIONS = ("binary_tensor_data", "classification")
_LEN = struct.Struct("<I")


def _bad(message: str) -> ImageError:
    return ImageError("bad_request", message, 400)


@dataclass(slots=True)
class Output:
    name: str
    binary: bool
    classification: int = 0  # k > 0: the classification extension's top-k strings


@dataclass(slots=True)
class InferRequest:
    entries: list[Entry]
    outputs: list[Output]
    id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return max((o.classification for o in self.outputs), default=1) or 1

    @property
    def all_probs(self) -> bool:
        return any(o.classification == 0 for o in self.outputs)


def parse_infer(
    body: bytes,
    header_length: str | None,
    *,
    input_shape: tuple[int, int, int],
    max_images: int,
    num_classes: int,
) -> InferRequest:
    """The body of POST .../infer -> the entries and the outputs asked for."""
    header, binary = _split(body, header_length)
    try:
        doc = json.loads(header)
    # ValueError: bad JSON, bad UTF-8, over-long integers; RecursionError: "[[[[...". All client input.
    except (ValueError, RecursionError) as e:
        raise _bad(f"the inference request is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise _bad("the inference request must be a JSON object with an `inputs` list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(
            f"send exactly one input: BYTES {IMAGE_INPUT!r} [N] of encoded images, or FP32 "
            f"{TENSOR_INPUT!r} [N, {', '.join(map(str, input_shape))}]"
        )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("`id` must be a string")
    params = _params(doc.get("parameters"), "parameters")
    entries, used = _input(inputs[0], binary, input_shape, max_images)
    if used != len(binary):
        raise _bad(f"the body carries {len(binary) - used} byte(s) of binary data no input claims")
    outputs = _outputs(doc.get("outputs"), params.get("binary_data_output") is True, num_classes)
    return InferRequest(entries, outputs, request_id, params)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if not body:
        raise ImageError("empty_body", "the request body is empty; send an inference request")
    if header_length is None:
        return body, b""
    h = header_length.strip()
    if not h.isascii() or not h.isdigit() or int(h) > len(body):
        raise _bad(f"Inference-Header-Content-Length {header_length[:40]!r} is not a length within the body")
    n = int(h)
    return body[:n], body[n:]


def _params(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"`{where}` must be an object")
    return value


def _shape(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise _bad(f"input {name!r}: `shape` must be a list of non-negative integers")
    return value


def _input(
    spec: dict[str, Any], binary: bytes, input_shape: tuple[int, int, int], max_images: int
) -> tuple[list[Entry], int]:
    name = spec.get("name")
    if not isinstance(name, str):
        raise _bad("the input needs a string `name`")
    shape = _shape(spec.get("shape"), name)
    datatype = spec.get("datatype")
    params = _params(spec.get("parameters"), "inputs[0].parameters")
    size = params.get("binary_data_size")
    if size is not None and (type(size) is not int or not 0 <= size <= len(binary)):
        raise _bad(f"input {name!r}: binary_data_size {size!r} is not within the binary part of the body")
    raw = binary[:size] if size is not None else None
    if raw is None and "data" not in spec:
        raise _bad(f"input {name!r} has neither `data` nor a binary_data_size parameter")
    n = shape[0] if shape else 0
    if n > max_images:
        raise _bad(f"{n} images in one request; the limit is {max_images}")
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or n < 1:
            raise _bad(f"input {name!r}: a BYTES input has shape [N] or [N, 1] with N >= 1, not {shape}")
        items = _split_bytes(raw, n, name) if raw is not None else _json_bytes(spec["data"], n, name)
        entries: list[Entry] = items
    elif datatype == "FP32":
        expected = [n, *input_shape]
        if len(shape) != 4 or shape[1:] != list(input_shape) or n < 1:
            want = ", ".join(map(str, input_shape))
            raise _bad(f"input {name!r}: an FP32 input has shape [N, {want}] (N >= 1), not {shape}")
        entries = list(_fp32(raw, spec.get("data"), expected, name))
    else:
        want = ", ".join(map(str, input_shape))
        raise _bad(
            f"input {name!r}: datatype {str(datatype)[:20]!r} is not accepted; send BYTES [N] "
            f"(encoded images) or FP32 [N, {want}] (preprocessed)"
        )
    return entries, size or 0


def _split_bytes(raw: bytes, n: int, name: str) -> list[Entry]:
    """Binary BYTES: each element is a 4-byte little-endian length, then that many bytes."""
    out: list[Entry] = []
    at = 0
    for i in range(n):
        if at + 4 > len(raw):
            raise _bad(f"input {name!r}: binary data ends before element {i}'s length prefix")
        (length,) = _LEN.unpack_from(raw, at)
        at += 4
        if at + length > len(raw):
            raise _bad(f"input {name!r}: element {i} claims {length} bytes; only {len(raw) - at} remain")
        out.append(Upload(raw[at : at + length], None))
        at += length
    if at != len(raw):
        raise _bad(f"input {name!r}: {len(raw) - at} byte(s) after the {n} element(s) its shape declares")
    return out


def _flatten(data: object) -> list[object]:
    if not isinstance(data, list):
        return [data]
    if all(not isinstance(x, list) for x in data):
        return data
    flat: list[object] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested array must not hit the recursion limit
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat


def _json_bytes(data: object, n: int, name: str) -> list[Entry]:
    """JSON BYTES: base64 text per element (MLServer's content_type=base64; accepted unmarked too)."""
    items = _flatten(data)
    if len(items) != n:
        raise _bad(f"input {name!r}: `data` has {len(items)} element(s); the shape says {n}")
    out: list[Entry] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            out.append(ImageError("bad_base64", f"element {i} is a {type(item).__name__}, not base64 text"))
            continue
        try:
            out.append(Upload(base64.b64decode("".join(item.split()), validate=True), None))
        except (binascii.Error, ValueError) as e:
            out.append(ImageError("bad_base64", f"element {i} is not valid base64: {e}"))
    return out


def _fp32(raw: bytes | None, data: object, shape: list[int], name: str) -> torch.Tensor:
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise _bad(f"input {name!r}: {len(raw)} bytes of FP32 data; shape {shape} needs {4 * count}")
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        items = _flatten(data)
        if len(items) != count:
            raise _bad(f"input {name!r}: `data` has {len(items)} value(s); shape {shape} needs {count}")
        if not all(type(x) in (int, float) for x in items):
            raise _bad(f"input {name!r}: FP32 `data` must hold only numbers")
        try:
            array = np.asarray(items, dtype=np.float32)
        except OverflowError:
            raise _bad(f"input {name!r}: a value does not fit in FP32") from None
    if not np.isfinite(array).all():
        raise _bad(f"input {name!r}: the tensor holds NaN or infinity (or a value beyond FP32's range)")
    return torch.from_numpy(array.reshape(shape))  # iterating yields (C, H, W) rows


def _outputs(spec: object, binary_default: bool, num_classes: int) -> list[Output]:
    if spec is None:
        return [Output(OUTPUT, binary_default)]
    if not isinstance(spec, list) or not spec:
        raise _bad('`outputs` must be a non-empty list of {"name": ...} objects')
    out: list[Output] = []
    for i, o in enumerate(spec):
        if not isinstance(o, dict) or o.get("name") != OUTPUT:
            raise _bad(f"outputs[{i}]: this model has one output, {OUTPUT!r}")
        params = _params(o.get("parameters"), f"outputs[{i}].parameters")
        binary = params.get("binary_data", binary_default)
        k = params.get("classification", 0)
        if type(binary) is not bool:
            raise _bad(f"outputs[{i}]: binary_data must be true or false")
        if type(k) is not int or k < 0:
            raise _bad(f"outputs[{i}]: classification must be a non-negative integer (the class count)")
        out.append(Output(OUTPUT, binary, min(k, num_classes)))
    return out


def render_infer(
    request: InferRequest, results: list[JobResult], model_name: str, model_version: str
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    n = len(results)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in request.outputs:
        if o.classification:
            values: list[Any] = [
                f"{p['probability']}:{p['index']}:{p['label']}"
                for r in results
                for p in r.predictions[: o.classification]
            ]
            spec: dict[str, Any] = {"name": o.name, "datatype": "BYTES", "shape": [n, o.classification]}
            blob = b"".join(_LEN.pack(len(b)) + b for b in (v.encode() for v in values))
        else:
            values = [p for r in results for p in (r.probabilities or [])]
            width = len(values) // n if n else 0
            spec = {"name": o.name, "datatype": "FP32", "shape": [n, width]}
            blob = struct.pack(f"<{len(values)}f", *values)  # a few floats: cheaper than via numpy
        if o.binary:
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = values
        outputs.append(spec)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    header = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "convserve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(
    name: str, version: str, input_shape: tuple[int, int, int], classes: int
) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [version],
        "platform": "pytorch",  # eager PyTorch (Triton's own name, pytorch_libtorch, means TorchScript)
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, *input_shape]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }
