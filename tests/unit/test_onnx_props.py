"""model.onnx_file.read_props: the metadata of an ONNX file read from the protobuf wire format
(no `onnx` import), the same as `onnx` reads it, and a clear error for a damaged file."""

from __future__ import annotations

import json
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


def test_set_metadata_writes_what_onnx_reads(tmp_path: Path) -> None:
    """The wire-format writer: convserve's keys set (an old entry of the same key replaced, others
    kept), producer_name set, the graph byte for byte what it was."""
    from model.checkpoint import CheckpointMeta
    from model.onnx_file import set_metadata

    meta = CheckpointMeta(arch="convnet", labels=["cat", "猫"], preprocess={"size": 32}, name="m")
    before = _model({"labels": "old", "kept": "yes"})
    after = set_metadata(before, meta, {"convserve.precision": "fp32"})
    path = tmp_path / "m.onnx"
    path.write_bytes(after)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    props = {p.key: p.value for p in loaded.metadata_props}
    assert props == read_props(path)
    assert props["kept"] == "yes" and props["labels"] == '["cat", "\\u732b"]'
    assert props["convserve.precision"] == "fp32" and json.loads(props["convserve"])["arch"] == "convnet"
    assert [p.key for p in loaded.metadata_props].count("labels") == 1
    assert loaded.producer_name == "convserve"
    assert loaded.graph.SerializeToString() == onnx.load_from_string(before).graph.SerializeToString()
    again = set_metadata(after, meta, {"convserve.precision": "int8"})
    assert read_props_of(again, tmp_path)["convserve.precision"] == "int8"
    assert len(onnx.load_from_string(again).metadata_props) == len(loaded.metadata_props)


def read_props_of(data: bytes, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "again.onnx"
    path.write_bytes(data)
    return read_props(path)
