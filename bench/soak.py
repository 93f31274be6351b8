"""`python -m bench soak`: many requests against one service process; does its memory keep growing?

RSS is read from /proc after start-up (idle) and after every chunk of requests. Chunks alternate
between concurrency levels so the batcher runs every batch size and the allocator sees varied shapes.
Growth is reported from idle (what the issue's "< 50 MB" means), from the end of warm-up (one chunk
at every concurrency level: allocator pools and per-batch-size buffers exist by then), and as the
slope over the second half (a leak shows as a steady slope; a one-off step does not).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from bench.inputs import ImageSet
from bench.loadgen import build_request, load
from bench.measure import HOST, PREDICT
from bench.servers import rss_mb, service_server

log = logging.getLogger(__name__)
# After the last chunk: longer than the service's idle trim wait (service/memory.py IDLE_S, 1 s) plus a
# poll, so the last reading shows what stays once the burst's freed memory could go back.
IDLE_READ_S = 3.0
TARGET_BYTES = 50e6  # the "less than 50 MB" (47.7 MiB)


def soak(ckpt: Path, images: ImageSet, env: dict[str, str], logs: Path, total: int,
         concurrencies: list[int], chunk: int = 1000) -> dict[str, Any]:
    server = service_server(ckpt, env, logs).start()
    try:
        reqs = [build_request(HOST, server.port, PREDICT, b, "image/jpeg") for b in images.load()]
        samples: list[tuple[int, float]] = [(0, server.idle_rss_mb)]
        errors = 0
        done = 0
        seconds = 0.0
        i = 0
        while done < total:
            n = min(chunk, total - done)
            res = load(HOST, server.port, reqs, concurrencies[i % len(concurrencies)], n)
            i += 1
            done += res.requests
            errors += res.errors
            seconds += res.seconds
            samples.append((done, rss_mb(server.pid)))
            log.info("soak: %d/%d requests, RSS %.1f MiB, %d errors", done, total, samples[-1][1], errors)
        time.sleep(IDLE_READ_S)
        idle_after = rss_mb(server.pid)
        log.info("soak: RSS %.1f MiB once idle (%.0f s after the last request)", idle_after, IDLE_READ_S)
    finally:
        server.stop()
    # warm = after one chunk at every concurrency level: every batch size and buffer size has been seen
    warm = samples[min(len(concurrencies), len(samples) - 1)][1]
    half = samples[len(samples) // 2 :]
    return {
        "requests": done,
        "errors": errors,
        "rps": done / seconds if seconds else 0.0,
        "cold_start_s": server.cold_start_s,
        "idle_rss_mb": server.idle_rss_mb,
        "final_rss_mb": samples[-1][1],
        "peak_rss_mb": max(s[1] for s in samples),
        "growth_from_idle_mb": samples[-1][1] - samples[0][1],
        "growth_after_warm_mb": samples[-1][1] - warm,
        "idle_after_rss_mb": idle_after,
        "growth_once_idle_mb": idle_after - samples[0][1],
        "slope_mb_per_10k": 1e4 * _slope(half),
        "samples": samples,
        "concurrencies": concurrencies,
    }


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MiB per request over `points` (0 when fewer than two)."""
    if len(points) < 2:
        return 0.0
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else 0.0


def render(res: dict[str, Any], title: str, command: str) -> str:
    def ok(mib: float) -> str:
        return "yes" if mib * 2**20 < TARGET_BYTES and res["errors"] == 0 else "NO"

    series = ", ".join(f"{n}: {rss:.0f}" for n, rss in res["samples"][:: max(1, len(res["samples"]) // 10)])
    return "\n".join([
        f"# Soak: {title}",
        "",
        f"Command: `{command}`",
        "",
        "| requests | errors | req/s | idle RSS MiB | final RSS MiB | peak RSS MiB | growth from idle MiB "
        "| growth after warm-up MiB | 2nd-half slope MiB/10k req | growth < 50 MB | RSS once idle MiB "
        "| growth once idle MiB | once idle < 50 MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
        f"| {res['requests']} | {res['errors']} | {res['rps']:.1f} | {res['idle_rss_mb']:.0f} | "
        f"{res['final_rss_mb']:.0f} | {res['peak_rss_mb']:.0f} | {res['growth_from_idle_mb']:.1f} | "
        f"{res['growth_after_warm_mb']:.1f} | {res['slope_mb_per_10k']:.1f} "
        f"| {ok(res['growth_from_idle_mb'])} | {res['idle_after_rss_mb']:.0f} "
        f"| {res['growth_once_idle_mb']:.1f} | {ok(res['growth_once_idle_mb'])} |",
        "",
        f"RSS (MiB) after N requests: {series}; clients alternate {res['concurrencies']} per 1000. "
        "Warm-up = the first chunk at each concurrency level. `final`: read right after the last "
        f"request (under load); `once idle`: {IDLE_READ_S:.0f} s later, when the service has handed "
        "the burst's freed heap back (service/memory.py).",
        "",
    ])
