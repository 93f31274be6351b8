"""Two-process DistributedDataParallel on the CPU (gloo), launched with torchrun as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from model.checkpoint import load_checkpoint, read_meta

from .conftest import REPO, tiny_flags


def test_torchrun_two_ranks_end_identical_and_rank0_writes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "training",
            "train",
            *tiny_flags(epochs=2),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) final weights sha256 ([0-9a-f]{64})", proc.stdout))
    assert set(digests) == {"0", "1"}, proc.stdout
    assert digests["0"] == digests["1"]  # DDP kept the replicas identical
    # only rank 0 reports epochs and writes files; the last checkpoint holds exactly those weights
    assert proc.stdout.count("epoch 2/2  train loss") == 1
    assert read_meta(out / "last.safetensors").weights_sha256 == digests["0"]
    loaded = load_checkpoint(out / "model.safetensors")
    assert loaded.meta.training["world_size"] == 2
    assert loaded.meta.training["val_images"] == 24
    assert loaded.meta.calibration["images"] == 24  # rank 0 calibrates on the whole split, not its shard
    assert "2 processes" in proc.stdout
    assert not list(out.glob("*.tmp"))
