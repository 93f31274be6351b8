"""Request id, request metrics and last-resort 500s, as one pure ASGI middleware.

Pure ASGI (not BaseHTTPMiddleware) because it sits on the hot path: it only wraps `send` to read the
status and add `X-Request-ID`, with no extra task or body copy per request.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.protocols import endpoint_label

log = logging.getLogger(__name__)
_MAX_ID = 200


class RequestIds:
    """32 hex characters: a random per-process prefix and a counter. Unique like a uuid4 for
    correlating logs across replicas, without reading os.urandom on every request (uuid4 was ~3% of
    the event loop's time under load)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def client_request_id(raw: bytes | None) -> str | None:
    """The client's X-Request-ID if it is printable ASCII of sane length, else None (we make one)."""
    if raw and len(raw) <= _MAX_ID and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    return None


def error_body(code: str, message: str, request_id: str | None, index: int | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if index is not None:
        err["index"] = index
    if request_id:
        err["request_id"] = request_id
    return {"error": err}


class InFlight:
    """Work requests being handled right now; the SIGTERM drain waits for this to reach zero."""

    def __init__(self) -> None:
        self.count = 0


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        endpoints: frozenset[str],
        work: frozenset[str],
        in_flight: InFlight,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.in_flight = in_flight
        self.endpoints = endpoints  # label values are bounded: unknown paths count as "other"
        self.work = work  # endpoints counted in convserve_in_flight_requests
        self._children: dict[tuple[str, int], Any] = {}
        self._ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = client_request_id(value)
                break
        rid = rid or self._ids.next()
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode("ascii"))
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path = scope["path"]
        endpoint = path if path in self.endpoints else (endpoint_label(path) or "other")
        counted = endpoint in self.work
        if counted:
            self.in_flight.count += 1
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request id %s)", scope["method"], path, rid)
            if not started:
                body = json.dumps(
                    error_body("internal_error", "internal server error; the log has this request id", rid)
                ).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body)),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            if counted:
                self.in_flight.count -= 1
                self.metrics.in_flight.dec()
            self._observe(endpoint, status, time.perf_counter() - start)

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                self.metrics.requests.labels(endpoint, str(status)),
                self.metrics.request_duration.labels(endpoint),
            )
        child[0].inc()
        child[1].observe(seconds)
