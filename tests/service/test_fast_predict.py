"""POST /v1/predict's two ways in: the ASGI fast path (a plain query) and the FastAPI route (any
other query) give one behaviour: the same answers, the same errors, counted the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi.routing
import pytest

from service.app import create_app
from service.routes.predict import plain_query
from service.settings import load_settings
from tests import images
from tests.conftest import LiveServer
from tests.service.helpers import ready_client, rejected


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (b"", (None, None)),
        (b"top_k=3", (3, None)),
        (b"top_k=1000&probabilities=all", (1000, "all")),
        (b"probabilities=all&top_k=007", (7, "all")),
    ],
)
def test_plain_queries_are_answered_on_the_fast_path(raw: bytes, parsed: Any) -> None:
    assert plain_query(raw) == parsed


@pytest.mark.parametrize(
    "raw",
    [b"top_k=0", b"top_k=1001", b"top_k=-3", b"top_k=many", b"top_k=", b"top_k", b"top_k=%33",
     b"top_k=3&top_k=4", b"top_k=3&", b"probabilities=some", b"probabilities=ALL", b"other=1",
     b"top_k=" + b"9" * 5000],
)
def test_anything_else_is_left_to_fastapi(raw: bytes) -> None:
    assert plain_query(raw) is None


def _strip(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    out.pop("timing_ms", None)
    if "error" in out:
        out["error"] = {k: v for k, v in out["error"].items() if k != "request_id"}
    return out


def test_both_ways_answer_alike_over_http(server: LiveServer) -> None:
    jpeg = {"content": images.jpeg(), "headers": {"Content-Type": "image/jpeg"}}
    fast = server.client.post("/v1/predict?top_k=2&probabilities=all", **jpeg)
    routed = server.client.post("/v1/predict?top_k=%32&probabilities=all", **jpeg)  # FastAPI parses it
    assert fast.status_code == routed.status_code == 200
    assert _strip(fast.json()) == _strip(routed.json()) and len(fast.json()["predictions"]) == 2
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    before = rejected(server, "corrupt_image")
    bad = {"content": b"not an image", "headers": {"Content-Type": "image/jpeg"}}
    fast = server.client.post("/v1/predict", **bad)
    routed = server.client.post("/v1/predict?top_k=%32", **bad)
    assert fast.status_code == routed.status_code == 400
    assert _strip(fast.json()) == _strip(routed.json()) and fast.json()["error"]["code"] == "corrupt_image"
    assert fast.headers["x-request-id"] == fast.json()["error"]["request_id"]
    assert rejected(server, "corrupt_image") == before + 2
    assert server.client.get("/v1/predict").status_code == 405  # not POST: FastAPI's answer


def test_the_fast_path_skips_fastapi_routing(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    solved: list[str] = []
    real = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kw: Any) -> Any:
        solved.append(kw["request"].url.path)
        return await real(*args, **kw)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    app = create_app(load_settings(checkpoint=tiny_checkpoint, torch_threads=1, warmup="max"))
    with ready_client(app) as c:
        solved.clear()
        r = c.post("/v1/predict?top_k=1", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        assert solved == []
        r = c.post("/v1/predict?top_k=%31", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        assert solved == ["/v1/predict"]
