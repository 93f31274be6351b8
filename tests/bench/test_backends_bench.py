"""`bench backends` parts that need no timing: the installed-size arithmetic, the report, and the worker
process protocol (a real worker on a tiny checkpoint; only that it answers, never how fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import image_size
from bench.backend_worker import Worker
from bench.backends import VARIANTS, render
from service.predictor import Predictor
from tests.conftest import make_checkpoint


class FakeDist:
    """A distribution as importlib.metadata gives it: RECORD files and Requires-Dist lines."""

    def __init__(self, root: Path, name: str, sizes: dict[str, int], requires: list[str]) -> None:
        self.root = root / name
        self.requires = requires
        self.files = list(sizes)
        for rel, n in sizes.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(b"x" * n)

    def locate_file(self, rel: str) -> Path:
        return self.root / rel


def fake_env(tmp_path: Path) -> dict[str, Any]:
    dists = {
        "convserve": FakeDist(tmp_path, "convserve", {}, [
            "torch==2", "pillow>=10",
            'onnxruntime>=1.18; extra == "onnx"', 'onnx>=1.16; extra == "onnx"',
            'openvino>=2024; extra == "openvino"', 'onnx>=1.16; extra == "openvino"',
            'pytest; extra == "dev"', 'pywin; sys_platform == "win32"',
        ]),
        "torch": FakeDist(tmp_path, "torch", {"torch/lib.so": 5_000_000}, ["nvidia-cublas", "numpy"]),
        "nvidia-cublas": FakeDist(tmp_path, "nvidia-cublas", {"a.so": 3_000_000}, []),
        "numpy": FakeDist(tmp_path, "numpy", {"n.so": 1_000_000}, []),
        "pillow": FakeDist(tmp_path, "pillow", {"p.so": 500_000}, []),
        "onnxruntime": FakeDist(tmp_path, "onnxruntime", {"o.so": 2_000_000}, ["numpy", "coloredlogs"]),
        "coloredlogs": FakeDist(tmp_path, "coloredlogs", {"c.py": 100_000}, []),
        "onnx": FakeDist(tmp_path, "onnx", {"x.so": 700_000, "gone.py": 0}, ["numpy", "protobuf[extra]"]),
        "protobuf": FakeDist(tmp_path, "protobuf", {"pb.so": 300_000}, []),
        "openvino": FakeDist(tmp_path, "openvino", {"ov.so": 4_000_000}, ["numpy"]),
        "pytest": FakeDist(tmp_path, "pytest", {"t.py": 9_000_000}, []),
    }
    (dists["onnx"].root / "gone.py").unlink()  # a RECORD entry whose file was removed counts as zero
    return dists


def test_backend_sizes_are_what_each_extra_adds_to_the_base(tmp_path: Path) -> None:
    dists = fake_env(tmp_path)
    sizes = image_size.backend_sizes(find=lambda name: dists.get(image_size.canonical(name)))  # type: ignore[arg-type,return-value]
    assert set(sizes["torch"]["packages"]) == {"torch", "nvidia-cublas", "numpy", "pillow"}
    assert sizes["torch"]["mb"] == pytest.approx(9.5)
    assert sizes["torch"]["cuda_mb"] == pytest.approx(3.0)
    # numpy is in the base already: not counted again; dev-only and other-platform packages never
    assert sizes["onnxruntime"]["packages"] == pytest.approx(
        {"onnxruntime": 2.0, "coloredlogs": 0.1, "onnx": 0.7, "protobuf": 0.3})
    assert sizes["openvino"]["mb"] == pytest.approx(4.0 + 0.7 + 0.3)
    assert sizes["openvino"]["extra"] == "openvino" and sizes["torch"]["extra"] is None


def test_backend_sizes_of_this_environment_name_the_real_packages() -> None:
    sizes = image_size.backend_sizes()
    if not sizes:
        pytest.skip("convserve is not installed in this environment (pip install -e .)")
    assert "torch" in sizes["torch"]["packages"] and sizes["torch"]["mb"] > 100
    for backend, package in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        if importlib.util.find_spec(package) is not None:
            assert package in sizes[backend]["packages"] and "torch" not in sizes[backend]["packages"]
            assert sizes[backend]["packages"][package] > 1


def result_fixture() -> dict[str, Any]:
    model_only = [{"arch": "convnet", "runtime": rt, "precision": pr, "batch": b, "images_per_s": 100.0 * b,
                   "vs_torch_fp32": 1.0, "peak_share": 0.25, "top1_agreement": 1.0, "cpu_after_call_s": 0.002}
                  for rt, pr in VARIANTS for b in (1, 16)]
    service = [{"arch": "convnet", "runtime": rt, "precision": pr, "clients": 16, "rps": 50.0,
                "vs_torch_fp32": 1.0, "p50_ms": 30.0, "p99_ms": 60.0, "errors": 0, "cold_start_s": 7.5,
                "idle_rss_mb": 700.0} for rt, pr in VARIANTS]
    sizes = {"torch": {"extra": None, "mb": 5884.0, "cuda_mb": 4334.0, "packages": {"torch": 1205.0}},
             "onnxruntime": {"extra": "onnx", "mb": 143.0, "cuda_mb": 0.0,
                             "packages": {"onnxruntime": 80.0, "onnx": 26.0}}}
    return {"command": "python -m bench backends --out x.md", "minutes": 12.25, "cpu": "AMD EPYC",
            "threads": 2, "load": "1.0-2.0", "peak_gflops": {"fp32": 100.0, "bf16": 300.0, "int8": 400.0},
            "model_only": model_only, "service": service, "image_size": sizes}


def test_render_has_every_table_with_one_row_per_variant() -> None:
    text = render(result_fixture())
    assert "python -m bench backends --out x.md` (12.2 min)" in text
    assert "fp32 100, bf16 300, int8 400 GFLOP/s" in text and "load average 1.0-2.0" in text
    rows = [line for line in text.splitlines() if line.startswith("| convnet |")]
    assert len(rows) == 12 + 6
    assert "| convnet | openvino | int8 | 16 | 1600.0 | 1.00 | 25% | 100.0% |" in rows
    assert "| convnet | onnxruntime | int8 | 16 | 50.0 | 1.00 | 30 | 60 | 0 | 7.5 | 700 |" in rows
    assert "| torch | (base install) | 5884 | 4334 | torch 1205 |" in text
    assert "| onnxruntime | onnx | 143 | 0 | onnxruntime 80, onnx 26 |" in text
    assert "openvino int8 2 ms" in text


@pytest.mark.slow  # a real worker process: torch's import and a model load
def test_worker_process_answers_rates_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(5)]
    pt = tmp_path / "images.pt"
    torch.save({"images": images[:3], "eval": images}, pt)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # importing service set it in this process
    w = Worker(ckpt, "torch", "fp32", pt, [1, 4], 1, tmp_path / "cache", tmp_path / "worker.log")
    try:
        w.wait_ready()
        assert w.ready["ready"] and w.ready["torch_threads"] == 1 and w.ready["rss_mb"] > 0
        assert w.ready["omp_wait_policy"] == "PASSIVE"  # the service's, though this process had none
        answer = w.ask({"batch": 4, "min_s": 0.0})
        assert answer["calls"] == 2 and answer["images_per_s"] > 0 and answer["torch_threads"] == 1
        labels = w.ask({"top1": True})["top1"]
        # the same answers as the service's predictor here, over the evaluation images (in batches of 4)
        here = Predictor.load(ckpt, torch.device("cpu")).forward(images).argmax(dim=1).tolist()
        assert labels == here
        assert w.settle(limit_s=1.0) >= 0
    finally:
        w.close()
    assert w.proc.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]


@pytest.mark.slow
def test_worker_that_cannot_load_says_why(tmp_path: Path) -> None:
    pt = tmp_path / "images.pt"
    torch.save({"images": [], "eval": []}, pt)
    with pytest.raises(RuntimeError, match="backend worker exited") as err:
        Worker(tmp_path / "missing.safetensors", "torch", "fp32", pt, [1], 1, tmp_path,
               tmp_path / "w.log").wait_ready()
    assert "missing.safetensors" in str(err.value)


def test_torch_bf16_is_left_out_without_bf16_hardware_and_the_report_says_so() -> None:
    from bench.backends import runnable_variants

    kept, skipped = runnable_variants([])
    assert ("torch", "bf16") not in kept and len(kept) == len(VARIANTS) - 1
    assert "no bf16 hardware" in skipped["torch bf16"]
    assert runnable_variants(["avx512_bf16"]) == (VARIANTS, {})
    result = result_fixture()
    result["skipped"] = skipped
    result["model_only"] = [r for r in result["model_only"] if (r["runtime"], r["precision"]) in kept]
    result["service"] = [r for r in result["service"] if (r["runtime"], r["precision"]) in kept]
    text = render(result)
    assert "Not run: torch bf16, no bf16 hardware" in text
    assert "all 5 up" in text and "| convnet | torch | bf16 |" not in text
