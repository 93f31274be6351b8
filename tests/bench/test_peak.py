"""bench/peak.py and the report's physical-limit columns: the FLOP convention (2 per multiply-add, like
the GEMM peak's 2n^3), the peak measurement's shape, and the share of peak in the scenario table.
No timing assertions: the peak is only checked to be a positive number per precision."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from bench import backends
from bench.peak import gflop_per_image, peak_gflops
from bench.report import limit_line, peak_share, scenario_table
from service.cpu_flags import cpu_bf16_flags


def test_a_convolution_counts_two_flops_per_multiply_add() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    macs = 8 * 4 * 4 * (3 * 3 * 3) + 8 * 4 * 4 * 10  # conv: per output pixel and channel; linear
    assert gflop_per_image(model, (3, 4, 4)) * 1e9 == pytest.approx(2 * macs)


def test_resnet18_is_twice_torchvisions_multiply_adds() -> None:
    """torchvision quotes resnet18 at 1.81 "GFLOPS", counting multiply-adds: 3.64 GFLOP here."""
    from torchvision.models import resnet18

    assert gflop_per_image(resnet18(), (3, 224, 224)) == pytest.approx(2 * 1.814, rel=0.01)


def test_peak_is_measured_per_precision_and_shared_with_backends() -> None:
    before = torch.get_num_threads()
    try:
        peaks = peak_gflops(1, n=64, repeats=2, bf16=True)  # tiny: cheap even where bf16 is emulated
        default = peak_gflops(1, n=64, repeats=2, int8=False)  # bf16 as /proc/cpuinfo says
    finally:
        torch.set_num_threads(before)
    assert set(peaks) == {"fp32", "bf16", "int8"} and all(v is not None and v > 0 for v in peaks.values())
    assert backends.peak_gflops is peak_gflops  # one implementation, imported by both benches
    assert set(default) == {"fp32", "bf16"} and default["fp32"] is not None and default["fp32"] > 0
    # Without bf16 hardware torch's bf16 is a scalar fallback (minutes for 2048^3): not measured.
    assert (default["bf16"] is not None) == bool(cpu_bf16_flags())


def test_a_cpu_without_bf16_hardware_gets_no_bf16_peak() -> None:
    peaks = peak_gflops(1, n=64, repeats=2, bf16=False, int8=False)
    assert peaks["bf16"] is None
    sc = scenario({**PEAK, "peak_gflops": {"fp32": 200.0, "bf16": None}}, precision="fp32")
    line = limit_line(sc)
    assert "bf16 not measured (no bf16 hardware)" in line and "at most 54.9 images/s" in line  # 200/3.64
    assert peak_share(sc, "service", 40.0) == pytest.approx((145.6, 145.6 / 200))


def scenario(peak: dict[str, Any] | None, precision: str = "bf16") -> dict[str, Any]:
    def summary(server: str, rps: float) -> dict[str, Any]:
        return {"server": server, "concurrency": 16, "rps": rps, "p50_ms": 100.0, "p90_ms": 110.0,
                "p99_ms": 120.0, "errors": 0, "rss_before_mb": 500.0, "rss_after_mb": 510.0,
                "server_cpu_ms": 20.0, "client_cpu_ms": 0.5, "other_cores": 0.1}

    sums = [summary("service", 40.0), summary("baseline", 20.0)]
    runs = [{**s, "round": 0} for s in sums]
    bound = {"images_per_s": 44.0, "cpu_ms_per_image": 18.0, "batch": 16, "decode_threads": 2,
             "torch_threads": 1, "precision": "fp32", "runs": [44.0], "count": 64}
    return {"summaries": sums, "runs": runs, "bound": bound, "peak": peak, "service_precision": precision}


PEAK = {"threads": 1, "matmul_n": 2048, "peak_gflops": {"fp32": 200.0, "bf16": 800.0, "int8": 900.0},
        "gflop_per_image": 3.64}


def test_share_of_peak_uses_the_servers_precision() -> None:
    sc = scenario(PEAK)
    assert peak_share(sc, "service", 40.0) == pytest.approx((145.6, 145.6 / 800))  # bf16 peak
    assert peak_share(sc, "baseline", 20.0) == pytest.approx((72.8, 72.8 / 200))  # fp32 peak
    table = "\n".join(scenario_table(sc))
    assert "| GFLOP/s | % of peak |" in table
    assert "| 145.6 | 18.2% bf16 |" in table and "| 72.8 | 36.4% fp32 |" in table
    assert "at most 219.8 images/s" in limit_line(sc)  # 800 / 3.64
    assert "2 FLOPs per multiply-add" in limit_line(sc)


def test_a_run_without_a_peak_says_so() -> None:
    sc = scenario(None)
    table = "\n".join(scenario_table(sc))
    assert "| - | - |" in table
    assert "not measured" in limit_line(sc)


def test_bf16_modes_are_skipped_without_bf16_hardware() -> None:
    from bench.run import runnable_modes

    modes = ("fp32", "bf16", "trace")
    kept, skipped = runnable_modes(modes, "cpu", [])
    assert kept == ("fp32", "trace") and "no bf16 hardware" in skipped["bf16"]
    assert runnable_modes(modes, "cpu", ["avx512_bf16"]) == (modes, {})
    assert runnable_modes(modes, "cuda", []) == (modes, {})  # the GPU's bf16 is its own question
