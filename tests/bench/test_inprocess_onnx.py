"""The in-process bound runs the service's runtime: ONNX Runtime on the service's exported file when
/v1/model says it serves onnxruntime (--runtime auto may choose it), torch otherwise."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.run import service_onnx_file
from model.checkpoint import load_checkpoint
from service.runtimes import build_runtime
from tests import images
from tests.conftest import REPO, make_checkpoint


def test_service_onnx_file_reads_v1_model() -> None:
    info = {"runtime": {"name": "onnxruntime", "onnx_file": "/m/x.onnxruntime.onnx"}}
    assert service_onnx_file(json.dumps(info)) == "/m/x.onnxruntime.onnx"
    assert service_onnx_file(json.dumps({"runtime": {"name": "torch"}})) is None
    assert service_onnx_file("not json") is None


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_the_bound_runs_onnxruntime_on_the_exported_file(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    rt = build_runtime("onnxruntime", load_checkpoint(ckpt), torch.device("cpu"), sha256="a" * 64,
                       cache_dir=tmp_path / "cache")
    onnx_file = str(rt.describe()["onnx_file"])
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for s in range(4):
        (folder / f"{s}.jpg").write_bytes(images.photo_jpeg((96, 80), seed=s))
    runs = {}
    for name, extra in (("torch", []), ("onnxruntime", ["--onnx", onnx_file])):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.inprocess", "--checkpoint", str(ckpt), "--images", str(folder),
             "--count", "8", "--batch", "4", "--torch-threads", "1", "--decode-threads", "1", *extra],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["torch"]["runtime"] == "torch" and runs["onnxruntime"]["runtime"] == "onnxruntime"
    assert all(r["images_per_s"] > 0 for r in runs.values())
