"""Two-process DistributedDataParallel on the CPU (gloo), launched with torchrun as a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, read_meta
from training.runs import load_state

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
    # the reported validation counts are the all-reduced sums of both shards (12 + 12), not rank 0's
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 24
    assert sum(map(sum, report["confusion_matrix"])) == 24
    assert loaded.meta.calibration["images"] == 24  # rank 0 calibrates on the whole split, not its shard
    assert "2 processes" in proc.stdout
    assert not list(out.glob("*.tmp"))
    # random ops differ between ranks (seed + rank) while the sampler and the weights stay in step,
    # and the state holds every rank's own RNG streams for a resume
    for rank in (0, 1):
        assert f"rank {rank}: random ops seeded with {rank}" in proc.stdout
    rank_rng = load_state(out / "train_state.pt")["rank_rng"]
    assert len(rank_rng) == 2
    assert not torch.equal(rank_rng[0]["rng"], rank_rng[1]["rng"])


def test_fewer_validation_images_than_ranks_does_not_hang(tmp_path: Path) -> None:
    """Rank 1 gets an empty validation shard; the all-reduced counts still cover the one image."""
    out = tmp_path / "ddp1"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "training", "train", *tiny_flags(epochs=1, val_size=1), "--out", str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # it hung forever before the fix
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # the all-reduced validation counts cover exactly the one image (rank 1 added zeros)
    assert report["samples"] == 1, report
    assert sum(map(sum, report["confusion_matrix"])) == 1, report
