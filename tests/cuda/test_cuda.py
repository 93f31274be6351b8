"""The CUDA path on a real GPU. Marked `cuda`: skipped with a reason where no GPU is visible
(tests/conftest.py), run by scripts/gpu-check.sh on a GPU machine. Not yet run on real hardware."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from service.device_health import device_failure, probe
from service.metrics import Metrics
from service.predictor import Predictor, check_precision
from service.state import warm_up
from tests import images
from tests.conftest import run_server
from training import fit

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda", 0)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}  # max |p_gpu - p_cpu| per probability


def _batch(predictor: Predictor, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, predictor.input_shape, dtype=torch.uint8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_predictor_agrees_with_the_cpu(tiny_checkpoint: Path, precision: str) -> None:
    major, _ = torch.cuda.get_device_capability(GPU)
    if precision == "bf16" and major < 8:
        pytest.skip("bf16 needs compute capability 8.0 (refused by check_precision, tested on the CPU)")
    cpu = Predictor.load(tiny_checkpoint, torch.device("cpu"), max_batch_size=4)
    gpu = Predictor.load(tiny_checkpoint, GPU, precision=precision, max_batch_size=4)
    gpu.warmup([1, 4])
    x = _batch(cpu)
    want, got = cpu.forward(x), gpu.forward(x)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert (got - want).abs().max().item() < TOLERANCE[precision]
    if precision == "fp32":  # TF32 is off by default, so fp32 on the GPU is fp32: the same top-1
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_healthy_device_passes_the_probe() -> None:
    probe(GPU)
    assert device_failure(ValueError("a bug in one batch"), GPU) is None
    check_precision(GPU, "fp16")


def test_memory_series_are_read_from_the_serving_device(tiny_checkpoint: Path) -> None:
    Predictor.load(tiny_checkpoint, GPU)  # something on the device
    m = Metrics()
    m.watch_gpus([GPU])
    text = m.render().decode()
    for name in ("allocated", "reserved", "used", "total"):
        assert f'convserve_gpu_memory_{name}_bytes{{device="cuda:0"}}' in text, name
    assert 'convserve_gpu_metrics_errors_total{device="cuda:0"} 0.0' in text


def test_warm_up_on_cuda_does_not_time_threads(tiny_checkpoint: Path) -> None:
    gpu = Predictor.load(tiny_checkpoint, GPU, max_batch_size=4)
    assert warm_up(gpu, [1, 4], all_threads=max(2, torch.get_num_threads())) == (1, 1)


def test_rng_round_trip_on_the_gpu() -> None:
    saved = fit._rng_state(GPU)
    expected = torch.rand(4, device=GPU)
    fit._restore_rng({**saved, "rank_rng": [saved]}, GPU, rank=0)
    assert torch.equal(torch.rand(4, device=GPU), expected)


def test_service_with_auto_picks_cuda(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with run_server(tiny_checkpoint, tmp_path, device="auto") as s:
        info = s.client.get("/v1/model").json()
        assert info["device"] == "cuda:0"
        assert info["tf32"] == {"enabled": False, "matmul": False, "cudnn": False}
        r = s.client.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        metrics = s.client.get("/metrics").text
        assert 'convserve_gpu_memory_reserved_bytes{device="cuda:0"}' in metrics
        assert "device auto -> cuda:0" in s.log_text()


def test_loaded_checkpoint_keeps_its_weights_on_the_gpu(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    gpu = Predictor(loaded, GPU)
    assert all(p.device == GPU for p in gpu.model.parameters())
