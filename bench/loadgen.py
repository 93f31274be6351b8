"""A minimal closed-loop HTTP/1.1 load generator: asyncio streams, keep-alive, pre-built requests.

Why not httpx or aiohttp: on a 2-core machine the client shares the CPU with the server it measures,
so every microsecond the client spends per request is taken from the server. Here a request is one
pre-built bytes object written to a socket and a response is one header read plus one exact-length
body read; the client's own CPU time is measured and reported next to the results.

Each of `concurrency` connections sends its next request as soon as the previous answer is read
(closed loop), until `total` requests have been sent. A status other than 200, a dropped connection
or a malformed response counts as an error; the connection is then reopened.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoadResult:
    concurrency: int
    requests: int  # completed (ok + errors)
    errors: int
    seconds: float
    rps: float  # completed requests per second (errors included; they are reported beside it)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cpu_s: float  # the load generator's own CPU time for this run
    statuses: dict[str, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list, repr=False)  # kept only when asked

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("bodies")
        return d


def build_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n"
    )
    return head.encode("latin-1") + body


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values) - 1e-9)))
    return sorted_values[rank - 1]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one response; supports Content-Length and chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = False
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            keep_alive = False
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts), keep_alive
    if length < 0:
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep_alive


async def _worker(
    host: str,
    port: int,
    requests: list[bytes],
    counter: itertools.count[int],
    total: int,
    latencies: list[float],
    statuses: Counter[str],
    keep: dict[int, bytes] | None,
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while True:
        i = next(counter)
        if i >= total:
            break
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
        assert reader is not None
        start = time.perf_counter()
        try:
            writer.write(requests[i % len(requests)])
            await writer.drain()
            status, body, keep_alive = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            statuses[type(e).__name__] += 1
            latencies.append(time.perf_counter() - start)
            writer.close()
            writer = None
            continue
        latencies.append(time.perf_counter() - start)
        statuses[str(status)] += 1
        if keep is not None:
            keep[i] = body
        if not keep_alive:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def run_load(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    total: int,
    keep_bodies: bool = False,
) -> LoadResult:
    """Send `total` requests (cycling through `requests`) from `concurrency` keep-alive connections."""
    counter = itertools.count()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    keep: dict[int, bytes] | None = {} if keep_bodies else None
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _worker(host, port, requests, counter, total, latencies, statuses, keep)
            for _ in range(concurrency)
        )
    )
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    lat = sorted(latencies)
    done = len(lat)
    errors = done - statuses.get("200", 0)
    return LoadResult(
        concurrency=concurrency,
        requests=done,
        errors=errors,
        seconds=seconds,
        rps=done / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(lat, 50) * 1000,
        p90_ms=percentile(lat, 90) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        client_cpu_s=cpu,
        statuses=dict(statuses),
        bodies=[keep[i] for i in sorted(keep)] if keep is not None else [],
    )


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with uvicorn[standard]): about half the client CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def load(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    total: int,
    keep_bodies: bool = False,
) -> LoadResult:
    """Synchronous wrapper: one fresh event loop per run."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(run_load(host, port, requests, concurrency, total, keep_bodies))
    finally:
        loop.close()
