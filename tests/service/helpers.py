"""Assertions shared by the live-server tests."""

from __future__ import annotations

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
