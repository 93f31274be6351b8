"""Shared fixtures: tiny checkpoints and a real uvicorn process on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.checkpoint import CheckpointMeta, save_checkpoint
from model.registry import build_model

REPO = Path(__file__).resolve().parents[1]
TINY_LABELS = ["circle", "square", "triangle", "star", "cross", "ring"]
# One conv block: builds and runs in milliseconds, so a test server is ready in about a second.
TINY_CONFIG: dict[str, Any] = {
    "blocks": [
        {"type": "conv", "out": 8, "kernel": 3, "padding": "same"},
        {"type": "relu"},
        {"type": "maxpool", "kernel": 2},
    ],
    "head": {"pool": "gap"},
}


def slow_config(layers: int = 4, channels: int = 64) -> dict[str, Any]:
    """A deliberately slow but real CNN: full-resolution 3x3 convolutions, no pooling."""
    blocks: list[dict[str, Any]] = []
    for _ in range(layers):
        blocks += [{"type": "conv", "out": channels, "kernel": 3, "padding": "same"}, {"type": "relu"}]
    return {"blocks": blocks, "head": {"pool": "gap"}}


def make_checkpoint(
    path: Path,
    *,
    labels: list[str] | None = None,
    size: int = 32,
    config: dict[str, Any] | None = None,
    name: str = "tiny",
    version: str = "1",
    seed: int = 0,
    channels: int = 3,
) -> Path:
    import torch

    labels = labels or TINY_LABELS
    torch.manual_seed(seed)
    config = config or TINY_CONFIG
    model = build_model("convnet", len(labels), channels, size, config)
    pre = {"size": size, "resize": size, "mode": "squash", "channels": channels, "mean": [0.5], "std": [0.25]}
    meta = CheckpointMeta(
        arch="convnet",
        labels=labels,
        preprocess=pre,
        arch_config=config,
        name=name,
        version=version,
        training={"data": "test fixture", "epochs": 0},
    )
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample as 'name{label="v",...}' -> value (labels sorted)."""
        text = self.client.get("/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_for(self, predicate: Any, what: str, timeout: float = 30.0) -> None:
        """Poll until predicate() is true (no timing assumptions: a generous ceiling only)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def run_server(
    checkpoint: Path, tmp: Path, *, cli: bool = False, ready_timeout: float = 120.0, **settings: Any
) -> Iterator[LiveServer]:
    """Start `uvicorn service.app:create_app --factory` (or `python -m service` when cli=True),
    configured through CONVSERVE_* variables, and wait until /readyz answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env["CONVSERVE_CHECKPOINT"] = str(checkpoint)
    env.setdefault("CONVSERVE_TORCH_THREADS", "1")  # tests run beside each other on 2 cores
    # The CPU unless told: on a GPU host `auto` would pick CUDA and change what a test measures.
    # scripts/gpu-check.sh sets CONVSERVE_TEST_DEVICE=auto to run the service tests on the GPU; tests
    # whose premise is CPU speed (slow models, 504, queue depth, drain) pass device="cpu" themselves.
    env["CONVSERVE_DEVICE"] = os.environ.get("CONVSERVE_TEST_DEVICE", "cpu")
    # torch unless told: the default (auto) would export and time onnxruntime at each start and serve
    # whichever ran faster on this machine, which changes what a test measures from one CPU to the
    # next; tests/service/test_runtime_auto.py runs the default itself.
    env["CONVSERVE_RUNTIME"] = "torch"
    env["PYTHONPATH"] = str(REPO)
    for key, value in settings.items():
        env[f"CONVSERVE_{key.upper()}"] = str(value)
    if cli:
        cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ]
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(proc, port, log)
    try:
        end = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.log_text()}")
            try:
                if server.client.get("/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"server not ready in {ready_timeout}s:\n{server.log_text()}")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A shared server with the tiny model and default settings (one per test module)."""
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp("server")) as server:
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests run only where a CUDA device is visible; elsewhere (this project's
    CPU machines and CI) they are skipped with the reason, never failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); scripts/gpu-check.sh runs these")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not `in keywords`: ids like [cuda] match that
            item.add_marker(skip)
@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default architecture trained on the shapes data by the real training code, smaller than
    the default run (2,800 images, 8 epochs: ~30 s on 2 idle cores) but accurate (about 98% top-1)."""
    from training.config import TrainConfig
    from training.fit import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = TrainConfig(
        out=str(out), epochs=8, train_size=2800, val_size=280, progress=False, workers=0, threads=2
    ).validate()
    result = train(cfg)
    assert result.best_accuracy > 0.9, f"the fixture model reached only {result.best_accuracy:.3f}"
    return out / "model.safetensors"


@pytest.fixture(autouse=True)
def _torch_runtime_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process settings (create_app(load_settings(...))) serve torch unless a test says otherwise,
    as run_server's subprocesses do: the default, auto, would serve whichever runtime this CPU ran
    faster and write its export and decision beside the shared test checkpoints."""
    monkeypatch.setenv("CONVSERVE_RUNTIME", "torch")
