"""--precision auto (service/precision.py): the decision on given numbers, the hardware check, the probe
images, the warm-up path on a real model, and a live service that reports its choice.

No timing assertions: the rule is driven with fixed timings; the real runs only check that a valid
choice was made, the loser dropped, and the reason given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import service.predictor
from service.precision import Measured, candidate, cpu_bf16_flags, decide, probe_images
from service.predictor import Predictor
from service.state import warm_up
from tests.conftest import run_server

CPU = torch.device("cpu")


def measured(batch: float, lone: float, agreed: int = 16) -> Measured:
    """bf16 at `batch` / `lone` times fp32's (fp32: 100 ms a batch of 8, 20 ms a lone image)."""
    return Measured("bf16", 8, 0.100, 0.100 * batch, 0.020, 0.020 * lone, agreed, 16)


@pytest.mark.parametrize(
    ("batch", "lone", "agreed", "want"),
    [
        (0.5, 0.5, 16, "bf16"),  # resnet18 on the AMD EPYC Zen 4: 2x at both
        (0.68, 1.05, 16, "bf16"),  # mobilenet_v3_small: batches gain a lot, a lone image loses 5%
        (0.95, 0.5, 16, "fp32"),  # batch within timing noise: not worth the rounding
        (0.5, 1.2, 16, "fp32"),  # the lone image loses 20%
        (0.5, 0.5, 15, "fp32"),  # one probe image changed its top-1 class
    ],
)
def test_decide(batch: float, lone: float, agreed: int, want: str) -> None:
    choice = decide(measured(batch, lone, agreed))
    assert choice.precision == want
    assert choice.setting == "auto" and choice.reason.startswith(f"auto: {want}")
    assert f"top-1 agreed {agreed}/16" in choice.reason
    assert choice.describe()["measured"]["agreed"] == agreed


def test_decide_names_the_numbers() -> None:
    reason = decide(measured(0.5, 0.8)).reason
    assert reason == ("auto: bf16 faster (2.00x fp32's speed at batch 8, 1.25x on a lone image), "
                      "top-1 agreed 16/16")


def test_candidate_needs_bf16_hardware(tmp_path: Path) -> None:
    assert candidate(CPU, "torch", ["avx512_bf16"]) == ("bf16", "avx512_bf16")
    assert candidate(CPU, "torch", [])[0] is None
    assert candidate(CPU, "onnxruntime", ["avx512_bf16"]) == (None, "onnxruntime runs fp32")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_bf16_flags(info) == ["avx512_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")  # plain AVX-512: bf16 is emulated
    assert cpu_bf16_flags(info) == []
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # aarch64 (Graviton 3)
    assert cpu_bf16_flags(info) == ["bf16"]
    assert cpu_bf16_flags(tmp_path / "missing") == []


def test_probe_images_are_deterministic_and_structured() -> None:
    a, b = probe_images((3, 32, 32)), probe_images((3, 32, 32))
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    f = a.float()
    # smooth: neighbouring pixels differ far less than random pixels do (uniform noise: ~85 levels)
    assert float((f[..., 1:] - f[..., :-1]).abs().mean()) < 30
    assert float(f.std(dim=(1, 2, 3)).min()) > 10  # but not flat
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("compile", ["off", "trace"])
def test_warm_up_settles_on_one_precision(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, compile: str
) -> None:
    """With a candidate (forced here, so the test runs on CPUs without bf16), warm-up probes and
    times both, keeps one runtime and says why; the model answers at the chosen precision."""
    monkeypatch.setattr(service.predictor, "candidate", lambda device, runtime: ("bf16", "forced"))
    p = Predictor.load(tiny_checkpoint, CPU, precision="auto", compile=compile, max_batch_size=4)
    assert p.precision == "fp32" and p.candidate == "bf16" and len(p._runtimes) == 2
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        warm_up(p, [1, 2, 4], all_threads=1)
    finally:
        torch.set_num_threads(before)
    info = p.describe()
    choice = info["precision_choice"]
    assert choice["setting"] == "auto" and choice["precision"] == info["precision"] in ("fp32", "bf16")
    assert choice["reason"].startswith(f"auto: {info['precision']}")
    assert p.candidate is None and list(p._runtimes) == [info["precision"]]
    assert p.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[info["precision"]]
    if compile == "trace":
        assert p.buckets == [1, 2, 4]
    assert torch.isfinite(p.forward([torch.zeros(p.input_shape, dtype=torch.uint8)] * 3)).all()


def test_fixed_precision_says_so(tiny_checkpoint: Path) -> None:
    p = Predictor.load(tiny_checkpoint, CPU, precision="bf16")
    assert p.describe()["precision_choice"]["reason"] == "set by --precision bf16"
    assert p.candidate is None


def test_service_reports_its_auto_choice(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with run_server(tiny_checkpoint, tmp_path, precision="auto", warmup="max", max_batch_size=4) as server:
        info = server.client.get("/v1/model").json()
        metrics = server.client.get("/metrics").text
        log = server.log_text()
    choice = info["precision_choice"]
    assert choice["setting"] == "auto"
    assert choice["precision"] == info["precision"] in ("fp32", "bf16")
    assert choice["reason"].startswith(f"auto: {info['precision']}")
    if cpu_bf16_flags():  # this CPU has bf16: the decision was measured, and its numbers are reported
        assert choice["measured"]["candidate"] == "bf16" and choice["measured"]["probes"] == 16
    assert f'precision="{info["precision"]}"' in metrics  # the info gauge follows the choice
    assert "precision auto: " in log
