"""ONNX Runtime's shared arena (service/runtimes/onnxruntime.py): it keeps a batch's tensors for the
next batch, and `release_memory` gives them back when asked; the answers do not change either way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from model.checkpoint import file_sha256, load_checkpoint
from service.memory import rss_mib, trim
from service.runtimes import build_runtime
from tests.conftest import make_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                reason="onnxruntime is not installed (pip install -e '.[onnx]')")
# 64 channels at 64x64 for a batch of 48: 48 MiB per activation, several alive in a run
WIDE = {"blocks": [{"type": "conv", "out": 64, "kernel": 3, "padding": "same"}, {"type": "relu"},
                   {"type": "conv", "out": 64, "kernel": 3, "padding": "same"}, {"type": "relu"}],
        "head": {"pool": "gap"}}
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
