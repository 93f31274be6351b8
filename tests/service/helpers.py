"""Assertions shared by the live-server tests."""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi import FastAPI

with warnings.catch_warnings():  # starlette asks for httpx2, which is not installed here
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from tests.conftest import TINY_LABELS, LiveServer

MAX_UPLOAD = 256 * 1024  # small limits so the 413 cases are cheap to send
MAX_PIXELS = 1_000_000


def check_predictions(preds: list[dict[str, object]], k: int) -> None:
    assert len(preds) == k
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)  # type: ignore[type-var]
    for p in preds:
        assert TINY_LABELS[p["index"]] == p["label"]  # type: ignore[index]
        assert 0.0 <= p["probability"] <= 1.0  # type: ignore[operator]


def same(a: list[dict[str, object]], b: list[dict[str, object]]) -> bool:
    """Equal up to float noise: a batch of several images may round differently from a batch of one."""
    return [p["index"] for p in a] == [p["index"] for p in b] and all(
        p["probability"] == pytest.approx(q["probability"], abs=1e-5) for p, q in zip(a, b, strict=True)
    )


def rejected(server: LiveServer, reason: str, protocol: str = "v1") -> float:
    key = f'convserve_rejected_images_total{{protocol="{protocol}",reason="{reason}"}}'
    return server.metrics().get(key, 0.0)


@contextmanager
def ready_client(app: FastAPI, timeout: float = 60.0) -> Iterator[TestClient]:
    """An in-process client, entered once the app has finished its background warm-up."""
    with TestClient(app) as c:
        end = time.monotonic() + timeout
        while (ready := c.get("/readyz")).status_code != 200:
            assert ready.json()["error"]["code"] == "not_ready", ready.json()  # e.g. warmup_failed
            assert time.monotonic() < end, f"not ready in {timeout}s: {ready.json()}"
            time.sleep(0.01)
        yield c


def read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body); a reset or a close before the whole answer fails the test."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"the server closed before answering (got {data!r})"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        got = sock.recv(65536)
        assert got, "the server closed in the middle of its answer"
        body += got
    return int(lines[0].split()[1]), headers, body[:length]
