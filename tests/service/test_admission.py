"""Admission covers decoding: images in the decode pool count against --queue-limit, and decoding
is bounded by the request deadline.

Decoding itself (`_decode_timed`, the neighbour of the route under test) is held on an event so the
pool is provably busy; everything else is the real app, driven in-process.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.pipeline as pipeline
from service.app import create_app
from service.settings import load_settings
from tests import images
from tests.service.helpers import ready_client


@pytest.fixture
def held_decode(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    release = threading.Event()
    real = pipeline._decode_timed

    def held(*args: Any) -> Any:
        assert release.wait(30), "the test never released the decode"
        return real(*args)

    monkeypatch.setattr(pipeline, "_decode_timed", held)
    # Held in the pool, where a decode can outlive the deadline: not on the event loop, where a lone
    # small upload would otherwise decode (and a held decode would hold the whole server).
    monkeypatch.setattr(pipeline, "INLINE_BYTES", 0)
    yield release
    release.set()


def _client(checkpoint: Path, **kw: Any) -> Any:
    settings = load_settings(checkpoint=checkpoint, torch_threads=1, warmup="max", decode_threads=2, **kw)
    return create_app(settings)


def _wait_decoding(app: Any, n: int) -> None:
    for _ in range(3000):
        if app.state.convserve.decoding == n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"never {n} image(s) decoding")


def test_images_being_decoded_count_against_the_queue_limit(
    tiny_checkpoint: Path, held_decode: threading.Event
) -> None:
    app = _client(tiny_checkpoint, queue_limit=2, max_images_per_request=2)
    with ready_client(app) as c:
        first: list[httpx.Response] = []
        files = [("file", (f"{i}.jpg", images.jpeg(), "image/jpeg")) for i in range(2)]
        t = threading.Thread(target=lambda: first.append(c.post("/v1/predict", files=files)))
        t.start()
        _wait_decoding(app, 2)
        r = c.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded" and "decoding" in r.json()["error"]["message"]
        held_decode.set()
        t.join(60)
        assert first[0].status_code == 200 and len(first[0].json()["results"]) == 2
        assert app.state.convserve.decoding == 0
        metrics = c.get("/metrics").text
        assert 'convserve_rejected_images_total{protocol="v1",reason="overloaded"} 1.0' in metrics
        ok = c.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200  # the slots were given back


def test_decoding_past_the_deadline_answers_504(tiny_checkpoint: Path, held_decode: threading.Event) -> None:
    app = _client(tiny_checkpoint, request_timeout_s=0.3)
    with ready_client(app) as c:
        body = {"images": [base64.b64encode(images.jpeg()).decode(), 7]}  # one upload, one bad entry
        r = c.post("/v1/predict", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert "spent decoding" in r.json()["error"]["message"]
        metrics = c.get("/metrics").text
        # nothing is lost silently: the upload counts as timed out, the bad entry as bad_base64,
        # although the request as a whole failed before any per-item answer was written
        assert 'convserve_rejected_images_total{protocol="v1",reason="timeout"} 1.0' in metrics
        assert 'convserve_rejected_images_total{protocol="v1",reason="bad_base64"} 1.0' in metrics
        held_decode.set()
    assert app.state.convserve.decoding == 0
