"""Queue full -> 503 + Retry-After, and waiting past the timeout -> 504, with a deliberately slow model.

The slow model is a real CNN (full-resolution 3x3 convolutions on a 384x384 input: 0.3 s to 1 s per
image on one core, by CPU; CI's took 0.29 s), so nothing in the service is faked. Each step waits on
the server's own metrics, not on sleeps.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import images
from tests.conftest import LiveServer, make_checkpoint, run_server, slow_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("slow") / "slow.safetensors", size=384, config=slow_config()
    )


def _decoded(server: LiveServer) -> float:
    return server.metrics().get('convserve_stage_duration_seconds_count{stage="decode"}', 0.0)


def _post_in_thread(server: LiveServer, out: list[httpx.Response]) -> threading.Thread:
    def go() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            out.append(c.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"}))

    t = threading.Thread(target=go)
    t.start()
    return t


@pytest.fixture(scope="module")
def busy_server(slow_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(
        slow_checkpoint,
        tmp_path_factory.mktemp("busy"),
        queue_limit=1,
        max_images_per_request=1,
        max_batch_size=1,
        request_timeout_s=300,
        device="cpu",  # the premise is a model slow enough to fill the queue: CPU speed
    ) as s:
        yield s


def test_full_queue_answers_503_with_retry_after_at_once(busy_server: LiveServer) -> None:
    s = busy_server
    base = _decoded(s)
    running: list[httpx.Response] = []
    queued: list[httpx.Response] = []
    t1 = _post_in_thread(s, running)
    # decoded and not queued -> the batcher has handed it to the model
    s.wait_for(
        lambda: _decoded(s) == base + 1 and s.metrics()["convserve_queue_depth"] == 0,
        "request 1 in the model",
    )
    t2 = _post_in_thread(s, queued)
    s.wait_for(lambda: s.metrics()["convserve_queue_depth"] == 1, "request 2 queued")

    r = s.client.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    assert r.headers["x-request-id"] == r.json()["error"]["request_id"]

    t1.join(120)
    t2.join(120)
    assert [x.status_code for x in running + queued] == [200, 200]
    m = s.metrics()
    assert m['convserve_rejected_images_total{protocol="v1",reason="overloaded"}'] == 1
    assert m["convserve_queue_limit"] == 1
    assert m['convserve_requests_total{code="503",endpoint="/v1/predict"}'] == 1


def test_waiting_past_the_timeout_answers_504(slow_checkpoint: Path, tmp_path: Path) -> None:
    # A timeout far below the model's time on any CPU we run on (0.3 s on the fastest seen): a 0.3 s
    # timeout let CI's forward of 0.286 s answer 200.
    with run_server(slow_checkpoint, tmp_path, max_batch_size=1, request_timeout_s=0.05, device="cpu") as s:
        r = s.client.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout"
        assert s.metrics()['convserve_rejected_images_total{protocol="v1",reason="timeout"}'] == 1
        # a timeout is the request's failure, not the server's
        assert s.client.get("/readyz").status_code == 200


def test_disconnected_client_is_dropped_before_the_model_runs_it(busy_server: LiveServer) -> None:
    s = busy_server
    before = s.metrics()
    gone = 'convserve_rejected_images_total{protocol="v1",reason="client_disconnected"}'
    running: list[httpx.Response] = []
    t1 = _post_in_thread(s, running)
    s.wait_for(
        lambda: _decoded(s) == _decoded_in(before) + 1 and s.metrics()["convserve_queue_depth"] == 0,
        "request 1 in the model",
    )
    body = images.jpeg()
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        head = (
            "POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        s.wait_for(lambda: s.metrics()["convserve_queue_depth"] == 1, "request 2 queued")
    # the socket is closed: the server notices, counts it, and frees the queue slot at once
    s.wait_for(lambda: s.metrics()[gone] == before[gone] + 1, "the disconnect to be counted")
    assert s.metrics()["convserve_queue_depth"] == 0
    t1.join(120)
    assert running[0].status_code == 200
    # one more request passes the dropped one's place in the queue; only 2 batches ran, not 3
    assert s.client.post("/v1/predict", content=body).status_code == 200
    assert s.metrics()["convserve_batch_size_count"] == before["convserve_batch_size_count"] + 2


def _decoded_in(metrics: dict[str, float]) -> float:
    return metrics.get('convserve_stage_duration_seconds_count{stage="decode"}', 0.0)
