"""`export --format onnx` and `quantize`: standalone ONNX files that other servers can run, and an int8
file that convserve serves like a checkpoint (quantize -> serve -> predict)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.onnx_file import read_onnx_artifact, read_props
from tests import images
from tests.conftest import run_server
from training.onnx_export import file_sha256

from .conftest import run_cli, tiny_flags

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "run"
    proc = run_cli("train", *tiny_flags(), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out / "model.safetensors"


def test_export_onnx_runs_in_onnxruntime_like_torch(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    proc = run_cli("export", "--format", "onnx", "--checkpoint", str(trained), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["source_sha256"] == file_sha256(trained)
    loaded = load_checkpoint(trained)
    props = read_props(out)
    # what a user serving it elsewhere needs, as plain JSON
    assert json.loads(props["labels"]) == loaded.meta.labels
    assert json.loads(props["preprocess"]) == loaded.meta.preprocess
    assert props["convserve.precision"] == "fp32"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *loaded.preprocess.input_shape)  # not the export's example batch size
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        want = loaded.model(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_onnx_needs_a_checkpoint(tmp_path: Path) -> None:
    proc = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr


def test_int8_round_trip_quantize_serve_predict(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.int8.onnx"
    proc = run_cli("quantize", "--checkpoint", str(trained), "--calibration-images", "16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["calibration_images"] == 16 and report["validation_images"] > 0
    assert 0.0 <= report["val_top1_int8"] <= 1.0 and 0.0 <= report["agreement_with_fp32"] <= 1.0
    artifact = read_onnx_artifact(out)
    assert artifact.precision == "int8" and artifact.source_sha256 == file_sha256(trained)
    # real calibration images travel as the probe the service checks the int8 graph on
    assert artifact.probe_images is not None and artifact.probe_images.dtype == torch.uint8
    assert artifact.meta.labels == load_checkpoint(trained).meta.labels
    props = read_props(out)
    assert "QuantizeLinear" in out.read_bytes().decode("latin-1")  # a QDQ graph, not the fp32 one
    assert json.loads(props["convserve.quantization"])["calibration_images"] == 16
    backends = [b for b in ("onnxruntime", "openvino") if importlib.util.find_spec(b) is not None]
    for backend in backends:
        with run_server(out, tmp_path, cli=True, runtime=backend) as server:
            info = server.client.get("/v1/model").json()
            assert info["precision"] == "int8" and info["runtime"]["name"] == backend
            assert info["classes"] == artifact.meta.labels
            r = server.client.post("/v1/predict", content=images.jpeg(), params={"top_k": 2})
            assert r.status_code == 200, r.text
            preds = r.json()["predictions"]
            assert len(preds) == 2 and all(p["label"] == artifact.meta.labels[p["index"]] for p in preds)
            assert preds[0]["probability"] >= preds[1]["probability"]


def test_torch_runtime_refuses_an_onnx_file_in_one_line(trained: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "m.onnx"
    assert run_cli("export", "--checkpoint", str(trained), "--out", str(out)).returncode == 0
    cmd = [sys.executable, "-m", "service", "--checkpoint", str(out), "--runtime", "torch"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--runtime onnxruntime/openvino" in r.stderr
