"""Property tests of the /v2 wire parser: random and mutated requests built from valid ones raise only
ImageError (the documented error type, a 4xx at the edge), never anything else."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ImageError
from service.protocols import v2

SHAPE = (3, 4, 4)
LIMITS = {"input_shape": SHAPE, "max_images": 8, "num_classes": 5}
FUZZ = settings(max_examples=200, deadline=None)


def _binary_request(files: list[bytes]) -> tuple[bytes, str]:
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(files)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True, "classification": 2}}],
    }
    text = json.dumps(header).encode()
    return text + blob, str(len(text))


def _json_request(files: list[bytes]) -> bytes:
    data = [base64.b64encode(f).decode() for f in files]
    doc = {"inputs": [{"name": "image", "shape": [len(files), 1], "datatype": "BYTES", "data": data}]}
    return json.dumps(doc).encode()


def _fp32_request(n: int) -> bytes:
    values = np.zeros((n, *SHAPE), dtype=np.float32).ravel().tolist()
    return json.dumps(
        {"inputs": [{"name": "input", "shape": [n, *SHAPE], "datatype": "FP32", "data": values}]}
    ).encode()


def _parse(body: bytes, header: str | None) -> None:
    try:
        request = v2.parse_infer(body, header, **LIMITS)  # type: ignore[arg-type]
    except ImageError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert 1 <= len(request.entries) <= LIMITS["max_images"]
    assert request.outputs


files = st.lists(st.binary(max_size=40), min_size=1, max_size=4)


def test_valid_requests_parse() -> None:
    body, header = _binary_request([b"abc", b""])
    assert len(v2.parse_infer(body, header, **LIMITS).entries) == 2  # type: ignore[arg-type]
    assert len(v2.parse_infer(_json_request([b"x"]), None, **LIMITS).entries) == 1  # type: ignore[arg-type]
    assert len(v2.parse_infer(_fp32_request(2), None, **LIMITS).entries) == 2  # type: ignore[arg-type]


@FUZZ
@given(files, st.data())
def test_mutated_binary_bodies(items: list[bytes], data: st.DataObject) -> None:
    body, header = _binary_request(items)
    buf = bytearray(body)
    for _ in range(data.draw(st.integers(0, 6))):
        if not buf:
            break
        at = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if action == "flip":
            buf[at] = data.draw(st.integers(0, 255))
        elif action == "drop":
            del buf[at]
        else:
            buf.insert(at, data.draw(st.integers(0, 255)))
    header = data.draw(
        st.one_of(st.just(header), st.none(), st.text(max_size=8), st.integers(-5, 500).map(str))
    )
    _parse(bytes(buf), header)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_random_json_documents(doc: object) -> None:
    _parse(json.dumps(doc).encode(), None)


@FUZZ
@given(files, st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), st.data())
def test_valid_json_with_one_field_replaced(items: list[bytes], key: str, data: st.DataObject) -> None:
    doc = json.loads(_json_request(items) if data.draw(st.booleans()) else _fp32_request(len(items)))
    junk = st.none() | st.integers(-3, 10**20) | st.floats() | st.text(max_size=6)
    doc["inputs"][0][key] = data.draw(
        junk | st.lists(junk, max_size=5) | st.dictionaries(st.text(max_size=20), junk)
    )
    _parse(json.dumps(doc).encode(), None)
