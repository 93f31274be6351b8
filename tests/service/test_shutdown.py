"""SIGTERM: /readyz turns 503, in-flight and late-arriving requests finish, the process exits in time.

Started with `python -m service` (the CLI path, which also sets uvicorn's graceful timeout).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests import images
from tests.conftest import make_checkpoint, run_server, slow_config

pytestmark = pytest.mark.slow
GRACE_S = 30


def test_sigterm_drains_in_flight_work(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "slow.safetensors", size=384, config=slow_config())
    with run_server(
        ckpt, tmp_path, cli=True, max_batch_size=1, drain_delay_s=1.0, grace_period_s=GRACE_S,
        device="cpu",  # in-flight work must still be running at SIGTERM: CPU speed
    ) as s:
        results: list[httpx.Response] = []

        def post() -> None:
            with httpx.Client(base_url=s.url, timeout=120) as c:
                results.append(
                    c.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
                )

        first = threading.Thread(target=post)
        first.start()
        s.wait_for(lambda: s.metrics()["convserve_in_flight_requests"] == 1, "a request in flight")

        s.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        s.wait_for(lambda: s.client.get("/readyz").status_code == 503, "/readyz 503 after SIGTERM")
        ready = s.client.get("/readyz")
        assert ready.json()["error"]["code"] == "shutting_down"
        assert s.client.get("/healthz").status_code == 200  # alive while draining
        # a load balancer may still send work during the drain delay: it is served, not dropped
        late = threading.Thread(target=post)
        late.start()

        first.join(120)
        late.join(120)
        assert [r.status_code for r in results] == [200, 200]
        try:
            code = s.proc.wait(GRACE_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {GRACE_S + 10}s after SIGTERM:\n{s.log_text()}")
        assert time.monotonic() - sent < GRACE_S + 10
        assert code == 0, s.log_text()  # a completed drain is a clean exit
        log = s.log_text()
        assert "SIGTERM: /readyz now 503" in log and "batcher drained" in log
        assert "Traceback" not in log
