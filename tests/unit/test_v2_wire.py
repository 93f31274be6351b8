"""The /v2 wire format on its own: binary and JSON bodies in, binary and JSON answers out."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from bench.protocols import v2_body
from service.errors import ImageError
from service.inputs import Upload
from service.predictor import JobResult
from service.protocols import v2

LIMITS = {"input_shape": (3, 2, 2), "max_images": 4, "num_classes": 3}


def _result(probs: list[float]) -> JobResult:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    preds = [{"label": "abc"[i], "index": i, "probability": probs[i]} for i in order]
    return JobResult(preds, probs, 0.0, 0.0, 1, preds[0]["label"], preds[0]["probability"], {})


def test_the_bench_binary_body_parses_to_the_same_file() -> None:
    body, header = v2_body(b"\x89PNG raw bytes")
    req = v2.parse_infer(body, str(header), **LIMITS)  # type: ignore[arg-type]
    assert req.entries == [Upload(b"\x89PNG raw bytes", None)]
    assert [(o.name, o.binary, o.classification) for o in req.outputs] == [("probabilities", True, 0)]


def test_fp32_json_becomes_tensors_and_nan_is_refused() -> None:
    values = list(range(24))
    doc = {"inputs": [{"name": "x", "shape": [2, 3, 2, 2], "datatype": "FP32", "data": values}]}
    req = v2.parse_infer(json.dumps(doc).encode(), None, **LIMITS)  # type: ignore[arg-type]
    assert [e.shape for e in req.entries] == [(3, 2, 2), (3, 2, 2)]  # type: ignore[union-attr]
    assert torch.equal(req.entries[1].flatten(), torch.arange(12, 24, dtype=torch.float32))  # type: ignore[union-attr]
    doc["inputs"][0]["data"] = [float("nan")] * 24
    with pytest.raises(ImageError, match="NaN"):
        v2.parse_infer(json.dumps(doc).encode(), None, **LIMITS)  # type: ignore[arg-type]


def test_binary_answer_round_trips() -> None:
    doc = {
        "id": "7",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "probabilities", "parameters": {"binary_data": True, "classification": 2}},
        ],
    }
    req = v2.parse_infer(json.dumps(doc).encode(), None, **LIMITS)  # type: ignore[arg-type]
    body, n = v2.render_infer(req, [_result([0.25, 0.5, 0.25])], "m", "1")
    assert n is not None
    head = json.loads(body[:n])
    assert head["id"] == "7" and head["model_name"] == "m" and head["model_version"] == "1"
    fp32, cls = head["outputs"]
    size = fp32["parameters"]["binary_data_size"]
    assert np.frombuffer(body[n : n + size], "<f4").tolist() == [0.25, 0.5, 0.25]
    rest = body[n + size :]
    assert len(rest) == cls["parameters"]["binary_data_size"] and cls["shape"] == [1, 2]
    (first,) = struct.unpack_from("<I", rest)
    assert rest[4 : 4 + first] == b"0.5:1:b"


def test_json_answer_without_binary() -> None:
    doc = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]}
    req = v2.parse_infer(json.dumps(doc).encode(), None, **LIMITS)  # type: ignore[arg-type]
    body, n = v2.render_infer(req, [_result([0.25, 0.5, 0.25])], "m", "1")
    assert n is None
    assert json.loads(body)["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 3], "data": [0.25, 0.5, 0.25]}
    ]
