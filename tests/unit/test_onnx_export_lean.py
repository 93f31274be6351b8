"""model.onnx_file.export_onnx skips torch's onnxscript pass for graphs of the standard domain only:
the pass would have returned the same bytes, and without it `onnx` stays out of the process (6 MiB
of a first start's RSS). A graph naming another domain still goes through torch's pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.onnx_file import export_onnx, opset_domains
from model.registry import build_model
from tests.conftest import REPO

onnx = pytest.importorskip("onnx", reason="onnx not installed (extra 'onnx')")


def _torch_pass() -> object:
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    return onnx_proto_utils._add_onnxscript_fn


def test_an_export_leaves_onnx_unimported(tmp_path: Path) -> None:
    # a fresh interpreter: whether a module was imported is process-wide state
    code = (
        "import sys\n"
        "from model.registry import build_model\n"
        "from model.onnx_file import export_onnx\n"
        "data = export_onnx(build_model('convnet', 3, 3, 32).eval(), (3, 32, 32))\n"
        "print('onnx' in sys.modules, len(data) > 1000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]


@pytest.mark.parametrize(("arch", "size"), [("convnet", 64), ("mobilenet_v3_small", 96)])
def test_torchs_pass_would_have_changed_nothing(arch: str, size: int) -> None:
    torch.manual_seed(0)
    data = export_onnx(build_model(arch, 4, 3, size).eval(), (3, size, size))
    assert opset_domains(data) == [o.domain for o in onnx.load_from_string(data).opset_import] == [""]
    original = _torch_pass().__wrapped__  # type: ignore[attr-defined]
    assert original(data, {}) == data


def _graph(domains: list[tuple[str, int]]) -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains])
    return bytes(model.SerializeToString())


def test_opset_domains_reads_what_onnx_reads() -> None:
    data = _graph([("", 17), ("com.microsoft", 1), ("ai.onnx.ml", 3)])
    assert opset_domains(data) == ["", "com.microsoft", "ai.onnx.ml"]


def test_another_domain_goes_through_torchs_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    export_onnx(build_model("convnet", 2, 3, 32).eval(), (3, 32, 32))  # installs the skip
    seen: list[bytes] = []

    def spy(model_bytes: bytes, custom_opsets: object) -> bytes:
        seen.append(model_bytes)
        return model_bytes

    skip = _torch_pass()
    monkeypatch.setattr(skip, "__wrapped__", spy)
    standard, custom = _graph([("", 17)]), _graph([("", 17), ("custom.ops", 1)])
    assert skip(standard, {}) == standard  # type: ignore[operator]
    assert skip(custom, {}) == custom  # type: ignore[operator]
    assert skip(standard, {"custom.ops": 1}) == standard  # type: ignore[operator]
    assert seen == [custom, standard]
