"""Warm-up runs with the port open: liveness answers at once, readiness and predictions wait for it.

The warm-up itself (service.state.warm_up, the neighbour of the lifespan under test) is replaced by
one that blocks until the test releases it, or that fails; everything else is the real app.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():  # starlette asks for httpx2, which is not installed here
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

import service.app
from service.app import create_app
from service.settings import load_settings
from tests import images
from tests.conftest import REPO, free_port
from tests.service.helpers import ready_client


def _settings(checkpoint: Path) -> Any:
    return load_settings(checkpoint=checkpoint, torch_threads=1, warmup="max", admin_api_key="k")


def test_port_answers_during_warm_up(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = service.app.warm_up

    def slow_warm_up(*args: Any) -> tuple[int, int]:
        assert release.wait(30), "the test never released the warm-up"
        return real(*args)

    monkeypatch.setattr(service.app, "warm_up", slow_warm_up)
    with TestClient(create_app(_settings(tiny_checkpoint))) as c:
        try:
            assert c.get("/healthz").json() == {"status": "ok"}  # a liveness probe does not kill us
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
            assert c.get("/v1/model").json()["serving"]["torch_threads"] is None  # not chosen yet
            early = c.post("/v1/predict", content=images.jpeg())
            assert early.status_code == 503 and early.headers["retry-after"] == "1"
            assert early.json()["error"]["code"] == "not_ready"
            files = [("file", (f"{i}.jpg", images.jpeg(), "image/jpeg")) for i in range(2)]
            assert c.post("/v1/predict", files=files).status_code == 503
            reload = c.post("/v1/model/reload", headers={"X-API-Key": "k"})
            assert reload.status_code == 503 and reload.json()["error"]["code"] == "not_ready"
            metrics = c.get("/metrics").text
            # 1 + 2 images
            assert 'convserve_rejected_images_total{protocol="v1",reason="not_ready"} 3.0' in metrics
            assert "convserve_ready 0.0" in metrics
        finally:
            release.set()


def test_requests_succeed_once_warm(tiny_checkpoint: Path) -> None:
    with ready_client(create_app(_settings(tiny_checkpoint))) as c:
        assert c.post("/v1/predict", content=images.jpeg()).status_code == 200
        assert "convserve_ready 1.0" in c.get("/metrics").text


def test_failed_warm_up_fails_liveness(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> tuple[int, int]:
        raise RuntimeError("out of memory while allocating the batch of 16")

    monkeypatch.setattr(service.app, "warm_up", broken)
    app = create_app(_settings(tiny_checkpoint))
    with TestClient(app) as c:
        state = app.state.convserve
        for _ in range(500):
            if state.failed:
                break
            threading.Event().wait(0.01)
        for probe in ("/healthz", "/readyz"):
            r = c.get(probe)
            assert r.status_code == 503, probe
            assert r.json()["error"]["code"] == "warmup_failed"
            assert "out of memory" in r.json()["error"]["message"]


def test_failed_warm_up_stops_the_process(tiny_checkpoint: Path) -> None:
    """A real `python -m service` process whose warm-up fails exits non-zero on its own."""
    code = (
        "import sys, service.app\n"
        "def broken(*a):\n"
        "    raise RuntimeError('the model failed on purpose')\n"
        "service.app.warm_up = broken\n"
        "from service.__main__ import main\n"
        f"sys.exit(main(['--checkpoint', {str(tiny_checkpoint)!r}, '--port', '0', '--torch-threads', '1',"
        " '--drain-delay-s', '0']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the model failed its warm-up: the model failed on purpose" in proc.stderr


def test_sigterm_during_warm_up_stops_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A real `python -m service` told to stop while warming up stops at the next batch size and
    exits 0 without ever reporting ready. Each blank batch is made slow so SIGTERM lands mid-way."""
    port = free_port()
    code = (
        "import sys, time, service.predictor as p\n"
        "run = p.Predictor.run_blank\n"
        "def slow(self, n):\n"
        "    time.sleep(1.0)\n"
        "    run(self, n)\n"
        "p.Predictor.run_blank = slow\n"
        "from service.__main__ import main\n"
        f"sys.exit(main(['--checkpoint', {str(tiny_checkpoint)!r}, '--port', '{port}',"
        " '--torch-threads', '1', '--max-batch-size', '64', '--drain-delay-s', '0']))\n"
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):  # the port opens once the checkpoint is loaded, before warm-up ends
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "warm-up stopped" in text and "ready:" not in text, text
