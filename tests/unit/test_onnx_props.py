"""model.onnx_file.read_props: the metadata of an ONNX file read from the protobuf wire format
(no `onnx` import), the same as `onnx` reads it, and a clear error for a damaged file."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import CheckpointError
from model.onnx_file import read_props

onnx = pytest.importorskip("onnx", reason="onnx not installed (extra 'onnx')")


def _model(props: dict[str, str]) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight],
    )
    model = helper.make_model(graph, producer_name="test")
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    return bytes(model.SerializeToString())


def test_reads_what_onnx_reads(tmp_path: Path) -> None:
    props = {"convserve": '{"a": 1}', "labels": '["é", "猫"]', "empty": "", "big": "x" * 100_000}
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(props))
    assert read_props(path) == props == {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_model({}))
    assert read_props(path) == {}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_file_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "m.onnx"
    data = _model({"convserve": "{}"})
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="is not a readable ONNX file"):
        read_props(path)
