"""The drain's edges against a real `python -m service`: SIGTERM with work queued behind the running
batch, a grace period that runs out, and a second SIGTERM.

A deliberately slow real CNN (full-resolution convolutions at 384x384, one image per batch) keeps
work queued while the test acts; on the CPU whatever the host (the premise is CPU speed)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests import images
from tests.conftest import LiveServer, make_checkpoint, run_server, slow_config

pytestmark = pytest.mark.slow
JPEG = images.jpeg()


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow.safetensors"
    return make_checkpoint(path, size=384, config=slow_config())


def start_requests(server: LiveServer, n: int) -> tuple[list[threading.Thread], list[str]]:
    """n concurrent POSTs, each on its own connection; an outcome is "200", "<status> <error code>"
    (plus " retry" when Retry-After is set) or the transport error's name."""
    outcomes: list[str] = []

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            try:
                r = c.post("/v1/predict", content=JPEG, headers={"Content-Type": "image/jpeg"})
            except httpx.TransportError as e:
                outcomes.append(type(e).__name__)
                return
            if r.status_code == 200:
                outcomes.append("200")
                return
            code = r.json()["error"]["code"] if "json" in r.headers.get("content-type", "") else r.text
            outcomes.append(f"{r.status_code} {code}" + (" retry" if "retry-after" in r.headers else ""))

    threads = [threading.Thread(target=post, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, outcomes


def queued(server: LiveServer, at_least: int) -> Callable[[], bool]:
    return lambda: server.metrics()["convserve_queue_depth"] >= at_least


def wait_exit(server: LiveServer, ceiling: float) -> tuple[int, float]:
    """(exit code, seconds from now); the ceiling only stops a hang, it is not a speed claim."""
    start = time.monotonic()
    try:
        code = server.proc.wait(ceiling)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {ceiling:.0f}s after SIGTERM:\n{server.log_text()}")
    return code, time.monotonic() - start


def test_sigterm_with_queued_work_serves_all_of_it(slow_checkpoint: Path, tmp_path: Path) -> None:
    with run_server(
        slow_checkpoint, tmp_path, cli=True, device="cpu", max_batch_size=1, drain_delay_s=0.2,
        grace_period_s=120,
    ) as s:
        threads, outcomes = start_requests(s, 4)
        s.wait_for(queued(s, 2), "two images queued behind the running batch", timeout=60)
        s.proc.send_signal(signal.SIGTERM)
        s.wait_for(lambda: s.client.get("/readyz").status_code == 503, "/readyz 503 while work is queued")
        assert s.metrics()["convserve_queue_depth"] >= 1  # still queued when the drain has begun
        for t in threads:
            t.join(150)
        code, _ = wait_exit(s, 150)
        log = s.log_text()
    assert outcomes == ["200"] * 4, f"{outcomes}\n{log}"  # queued work is finished, not refused
    assert code == 0, log
    assert "batcher drained" in log and "grace period" not in log and "Traceback" not in log


def test_a_grace_period_that_runs_out_answers_the_rest_503_and_stops(
    slow_checkpoint: Path, tmp_path: Path
) -> None:
    with run_server(
        slow_checkpoint, tmp_path, cli=True, device="cpu", max_batch_size=1, drain_delay_s=0.2,
        grace_period_s=1,
    ) as s:
        threads, outcomes = start_requests(s, 8)
        s.wait_for(queued(s, 4), "four images queued behind the running batch", timeout=60)
        s.proc.send_signal(signal.SIGTERM)
        code, _ = wait_exit(s, 120)
        for t in threads:
            t.join(30)
        log = s.log_text()
    assert all(not t.is_alive() for t in threads), "a client was left waiting after the server exited"
    assert "grace period (1.0s) over with work left: stopping anyway" in log, log
    # what did not fit in the grace period is answered 503 shutting_down with Retry-After (another
    # replica takes it), never a 500 or a dropped connection; and the cut did happen
    assert len(outcomes) == 8
    assert set(outcomes) <= {"200", "503 shutting_down retry"}, f"{outcomes}\n{log}"
    assert "503 shutting_down retry" in outcomes, f"{outcomes}\n{log}"
    assert code == 0, log
    print("outcomes after the grace period ran out:", sorted(outcomes))  # shown with -s


def test_a_second_sigterm_stops_waiting(slow_checkpoint: Path, tmp_path: Path) -> None:
    """A 60 s drain delay and grace period: the first SIGTERM starts the drain, the second must end
    the process long before the drain would have."""
    with run_server(
        slow_checkpoint, tmp_path, cli=True, device="cpu", max_batch_size=1, drain_delay_s=60,
        grace_period_s=60,
    ) as s:
        s.proc.send_signal(signal.SIGTERM)
        s.wait_for(lambda: s.client.get("/readyz").status_code == 503, "/readyz 503 after SIGTERM")
        assert s.proc.poll() is None  # draining: the delay keeps it up
        s.proc.send_signal(signal.SIGTERM)
        code, seconds = wait_exit(s, 45)  # far below the 60 s delay the first SIGTERM started
        log = s.log_text()
    assert code == 0, log
    assert "SIGTERM: /readyz now 503" in log and "batcher drained" in log
    print(f"exited {seconds:.1f}s after the second SIGTERM")
