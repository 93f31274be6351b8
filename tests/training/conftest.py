"""Fixtures for training tests: tiny settings, a generated image folder, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
# Tiny but real: 32x32 inputs still pass all four pooling stages of the default CNN.
TINY: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 16,
    "train_size": 48,
    "val_size": 24,
    "image_size": 32,
    "progress": False,
    "threads": 1,
    "warmup_epochs": 0.0,
}


def tiny_config(tmp_path: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **kw}).validate()


def tiny_flags(**kw: Any) -> list[str]:
    """TINY as command-line flags."""
    flags: list[str] = []
    for name, value in {**TINY, **kw}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`python -m training ARGS` in a fresh process, as a user runs it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image_folder(root: Path, per_class: int = 8, size: int = 20, corrupt: int = 1) -> Path:
    """root/<colour>/<i>.png|jpg: solid-ish colour images a CNN separates at once, plus `corrupt`
    files that are not images at all (and one hidden file, which is ignored)."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    for j in range(corrupt):
        (root / "red" / f"broken{j}.jpg").write_bytes(b"this is not a JPEG")
    (root / "green" / ".DS_Store").write_bytes(b"\x00\x01")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")
