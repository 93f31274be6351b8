"""The ONNX Runtime and OpenVINO backends: same answers as torch through a live server, the export
cache, the probe check, and the one-line error for a runtime that is not installed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint
from model.onnx_file import read_props
from service.runtimes import RuntimeUnavailable, build_runtime, check_installed
from service.runtimes.base import FP32_TOLERANCE
from service.runtimes.export import KEY_PROP, exported_onnx
from tests import images
from tests.conftest import REPO, LiveServer, make_checkpoint, run_server

BACKENDS = [b for b in ("onnxruntime", "openvino") if importlib.util.find_spec(b) is not None]
# conv -> bn -> relu twice: batch-norm folding and the export both have something to do.
BN_CONFIG: dict[str, Any] = {
    "blocks": [
        {"type": "conv", "out": 8, "kernel": 3, "padding": "same"},
        {"type": "bn"},
        {"type": "relu"},
        {"type": "maxpool", "kernel": 2},
        {"type": "conv", "out": 16, "kernel": 3, "padding": "same"},
        {"type": "bn"},
        {"type": "relu"},
    ],
    "head": {"pool": "gap"},
}
TEST_IMAGES = [images.jpeg(), images.png("RGB"), *(images.photo_jpeg((96, 80), seed=s) for s in range(4))]


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("rt") / "bn.safetensors", config=BN_CONFIG, seed=3)


@pytest.fixture(scope="module")
def torch_answers(bn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    with run_server(bn_checkpoint, tmp_path_factory.mktemp("torch")) as server:
        return [_predict(server, blob) for blob in TEST_IMAGES]


def _predict(server: LiveServer, blob: bytes) -> dict[str, Any]:
    r = server.client.post("/v1/predict", content=blob, params={"probabilities": "all", "top_k": 1})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_answers_like_torch(
    backend: str, bn_checkpoint: Path, torch_answers: list[dict[str, Any]], tmp_path: Path
) -> None:
    with run_server(bn_checkpoint, tmp_path, runtime=backend, max_batch_size=4) as server:
        info = server.client.get("/v1/model").json()
        assert info["runtime"]["name"] == backend and info["runtime"]["version"]
        assert info["precision"] == "fp32"
        got = [_predict(server, blob) for blob in TEST_IMAGES]
        # the same images in one multipart request: batched through the dynamic batch axis
        files = [("file", (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(TEST_IMAGES)]
        batched = server.client.post("/v1/predict", files=files, params={"probabilities": "all"}).json()
        log = server.log_text()
    assert "matches the torch model on the probe batch" in log
    for want, one, many in zip(torch_answers, got, batched["results"], strict=True):
        assert one["predictions"][0]["index"] == want["predictions"][0]["index"]
        for probs in (one["probabilities"], many["probabilities"]):
            diff = max(abs(a - b) for a, b in zip(probs, want["probabilities"], strict=True))
            assert diff <= FP32_TOLERANCE, (backend, diff)
    # the predictions differ between images: a constant output would pass the comparison above
    assert len({json.dumps(a["probabilities"][:2]) for a in torch_answers}) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_export_cache_is_rebuilt(backend: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.safetensors", config=BN_CONFIG)
    loaded = load_checkpoint(ckpt)
    sha = "a" * 64
    first = exported_onnx(loaded, sha, backend, "1.0", True, None)
    assert first == ckpt.with_name("m.safetensors." + backend + ".onnx")
    stamp = first.stat().st_mtime_ns
    assert exported_onnx(loaded, sha, backend, "1.0", True, None) == first
    assert first.stat().st_mtime_ns == stamp  # a hit: not written again
    # a new runtime version, then a new checkpoint: each re-exports in place
    exported_onnx(loaded, sha, backend, "2.0", True, None)
    assert json.loads(read_props(first)[KEY_PROP])["runtime_version"] == "2.0"
    exported_onnx(loaded, "b" * 64, backend, "2.0", True, None)
    assert json.loads(read_props(first)[KEY_PROP])["source_sha256"] == "b" * 64
    # a damaged cache file is rebuilt, not fatal
    first.write_bytes(b"not onnx")
    exported_onnx(loaded, "b" * 64, backend, "2.0", True, None)
    assert KEY_PROP in read_props(first)


def test_export_falls_back_when_the_checkpoint_folder_cannot_be_written(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    # root may write anywhere, so make the place beside the checkpoint unusable another way
    (tmp_path / "m.safetensors.onnxruntime.onnx").mkdir()
    (tmp_path / "m.safetensors.onnxruntime.onnx" / "x").write_text("occupied")
    path = exported_onnx(load_checkpoint(ckpt), "c" * 64, "onnxruntime", "1", True, tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and path.is_file()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime is not installed")
def test_a_graph_that_differs_from_torch_refuses_to_start(tmp_path: Path, monkeypatch: Any) -> None:
    ckpt = make_checkpoint(tmp_path / "m.safetensors", config=BN_CONFIG)
    other = make_checkpoint(tmp_path / "other.safetensors", config=BN_CONFIG, seed=9)
    # the cache entry for `m` holds `other`'s graph under `m`'s key (a wrong export)
    sha = "d" * 64
    wrong = exported_onnx(load_checkpoint(other), sha, "onnxruntime", "1", True, None)
    import service.runtimes as runtimes

    monkeypatch.setattr(runtimes, "_version", lambda _runtime: "1")
    shutil.copy(wrong, ckpt.with_name("m.safetensors.onnxruntime.onnx"))
    with pytest.raises(CheckpointError, match=r"differs from the torch model .* tolerance is 0\.0001"):
        build_runtime("onnxruntime", load_checkpoint(ckpt), torch.device("cpu"), sha256=sha)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_missing_runtime_is_a_one_line_error_naming_the_extra(backend: str, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    extra = {"onnxruntime": "onnx", "openvino": "openvino"}[backend]
    with pytest.raises(RuntimeUnavailable, match=rf"pip install 'convserve\[{extra}\]'"):
        check_installed(backend)


def test_cli_reports_a_missing_runtime_in_one_line(tiny_checkpoint: Path) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from service.__main__ import main\n"
        f"sys.exit(main(['--checkpoint', {str(tiny_checkpoint)!r}, '--runtime', 'onnxruntime']))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "onnxruntime" in lines[0] and "pip install 'convserve[onnx]'" in lines[0]


def test_onnx_backends_refuse_torch_only_precisions(tiny_checkpoint: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="--precision bf16 is for --runtime torch"):
        build_runtime("onnxruntime", load_checkpoint(tiny_checkpoint), torch.device("cpu"),
                      sha256="e" * 64, precision="bf16")



@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime is not installed")
def test_reload_goes_through_the_same_export_and_check(tmp_path: Path) -> None:
    v1 = make_checkpoint(tmp_path / "v1.safetensors", config=BN_CONFIG, version="1")
    v2 = make_checkpoint(tmp_path / "v2.safetensors", config=BN_CONFIG, version="2", seed=5)
    with run_server(v1, tmp_path, runtime="onnxruntime", admin_api_key="k") as server:
        before = server.client.post("/v1/predict", content=TEST_IMAGES[2], params={"probabilities": "all"})
        r = server.client.post("/v1/model/reload", json={"checkpoint": str(v2)}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        after = server.client.post("/v1/predict", content=TEST_IMAGES[2], params={"probabilities": "all"})
        info = server.client.get("/v1/model").json()
        log = server.log_text()
    assert info["version"] == "2" and info["runtime"]["name"] == "onnxruntime"
    assert info["runtime"]["onnx_file"] == str(v2.with_name("v2.safetensors.onnxruntime.onnx"))
    assert log.count("matches the torch model on the probe batch") == 2
    assert after.json()["model"]["version"] == "2"
    assert after.json()["probabilities"] != before.json()["probabilities"]  # the new weights answer
