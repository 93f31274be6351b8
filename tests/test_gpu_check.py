"""scripts/gpu-check.sh on a machine without a GPU: it exits at once, says why, and runs nothing.
The summary it writes on a GPU machine is rendered from step results (tested with made-up ones)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check


def test_shell_script_without_a_gpu_exits_at_once(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with the basics but no nvidia-smi, as on a CPU machine
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mkdir", "timeout"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([str(REPO / "scripts/gpu-check.sh"), str(out)], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == gpu_check.NO_GPU
    assert "no NVIDIA GPU on this machine" in proc.stderr and "nothing was run" in proc.stderr
    assert time.monotonic() - start < 10
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_python_part_without_cuda_exits_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == gpu_check.NO_GPU
    assert "torch sees no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_summary_lists_every_step_and_fails_on_any_failure(tmp_path: Path) -> None:
    report = gpu_check.Report(tmp_path)
    report.step("works", lambda: "fine")

    def broken() -> str:
        raise AssertionError("reload answered 400")

    report.step("breaks", broken)
    report.numbers["GPU"] = "NVIDIA H100"
    text = report.render()
    assert "| works | pass |" in text and "| breaks | **FAIL** |" in text
    assert "AssertionError: reload answered 400" in text and "| GPU | NVIDIA H100 |" in text
    assert not report.ok


def test_bench_rows_are_found_in_the_bench_json() -> None:
    doc = {"results": {"scenarios": [{"summaries": [
        {"server": "service", "concurrency": 16, "rps": 900.0, "p50_ms": 17.0, "p99_ms": 40.0},
        {"server": "baseline", "concurrency": 16, "rps": 200.0, "p50_ms": 80.0, "p99_ms": 120.0}]}]}}
    rows = gpu_check.bench_rows(doc)
    assert [(r["server"], r["rps"]) for r in rows] == [("service", 900.0), ("baseline", 200.0)]
