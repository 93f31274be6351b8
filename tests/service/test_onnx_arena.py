"""ONNX Runtime's shared arena (service/runtimes/onnxruntime.py): it keeps a batch's tensors for the
next batch, and `release_memory` gives them back when asked (the runtime alone, and a live service
once idle); the answers do not change either way."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.checkpoint import file_sha256, load_checkpoint
from service.memory import rss_mib, trim
from service.runtimes import build_runtime
from tests import images
from tests.conftest import make_checkpoint, run_server, slow_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                reason="onnxruntime is not installed (pip install -e '.[onnx]')")
# 64 channels at 64x64 for a batch of 48: 48 MiB per activation, several alive in a run
WIDE = slow_config(layers=2, channels=64)
ACTIVATION_MIB = 48 * 64 * 64 * 64 * 4 / 2**20


def test_the_arena_keeps_a_batchs_tensors_until_released(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "wide.safetensors", size=64, config=WIDE, seed=1)
    rt = build_runtime("onnxruntime", load_checkpoint(ckpt), torch.device("cpu"), sha256=file_sha256(ckpt))
    x = torch.rand(48, 3, 64, 64)
    want = rt.run(x).clone()
    trim()
    held = rss_mib()
    trim()  # glibc's free pages only: the arena still holds the batch's blocks
    assert held - rss_mib() < ACTIVATION_MIB / 2, "the arena gave its blocks back without being asked"
    rt.release_memory()
    returned = held - (trim(), rss_mib())[1]
    assert returned >= ACTIVATION_MIB, f"release_memory gave back {returned:.0f} MiB"
    assert torch.equal(rt.run(x), want)  # the shrink's blank run changed nothing; the next batch regrows


def test_an_idle_service_gives_the_arena_back(tmp_path: Path) -> None:
    # 96x96 at 64 channels: 2.25 MiB per image per activation, and the model is slow enough (1.3
    # GFLOP an image) that 16 clients fill batches of several images
    ckpt = make_checkpoint(tmp_path / "wide.safetensors", size=96, config=WIDE, seed=2)
    per_image_mib = 64 * 96 * 96 * 4 / 2**20
    with run_server(ckpt, tmp_path, runtime="onnxruntime", max_batch_size=16) as server:
        trims, returned = "convserve_memory_trims_total", "convserve_memory_returned_bytes_total"
        before = server.metrics()
        body = images.photo_jpeg((96, 96), seed=3)

        def post(_: int) -> int:
            return server.client.post("/v1/predict", content=body).status_code

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(post, range(48))) == [200] * 48
        sizes = server.metrics()
        batches = sizes["convserve_batch_size_count"] - before.get("convserve_batch_size_count", 0)
        mean_batch = 48 / batches
        server.wait_for(lambda: server.metrics()[trims] > before[trims], "a trim once idle", timeout=30)
        given = (server.metrics()[returned] - before[returned]) / 2**20
    # the arena held at least one activation of the mean batch (68 MiB came back on Zen 4, batches of
    # 8); with the runtime's release unwired, malloc_trim alone returned 2.8-2.9 MiB
    assert given >= per_image_mib * mean_batch, f"{given:.1f} MiB given back, batches of {mean_batch:.1f}"
