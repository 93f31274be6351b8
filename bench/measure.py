"""Measuring servers: alternate rounds, per-run server RSS/CPU, medians and ratios.

Servers of one comparison are all started first and stay up; each round then runs every concurrency
level against each server in turn, swapping the order every round, so slow drift on a shared machine
(another process waking up, thermal limits) lands on both sides equally. Medians over rounds are what
the report shows; the raw runs go into the JSON file beside it.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, build_request, load
from bench.servers import REPO, Server, cpu_seconds, machine_busy_seconds, rss_mb

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
PREDICT = "/v1/predict"


@dataclass
class Run:
    server: str
    round: int
    result: LoadResult
    rss_before_mb: float
    rss_after_mb: float
    server_cpu_s: float
    other_cpu_s: float  # CPU used meanwhile by processes other than this server and the client

    def to_dict(self) -> dict[str, Any]:
        return {"server": self.server, "round": self.round, **self.result.to_dict(),
                "rss_before_mb": self.rss_before_mb, "rss_after_mb": self.rss_after_mb,
                "server_cpu_s": self.server_cpu_s, "other_cpu_s": self.other_cpu_s}


@dataclass
class Summary:
    server: str
    concurrency: int
    rounds: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    requests: int
    rss_before_mb: float  # before the first round
    rss_after_mb: float  # after the last round
    server_cpu_ms: float  # server CPU per request
    client_cpu_ms: float  # load generator CPU per request
    other_cores: float  # mean cores busy with other processes during the runs
    rps_runs: list[float] = field(default_factory=list)


def measure_once(server: Server, requests: list[bytes], concurrency: int, total: int, rnd: int,
                 warmup: int) -> Run:
    if warmup:
        load(HOST, server.port, requests, concurrency, warmup)
    rss0, cpu0, busy0 = rss_mb(server.pid), cpu_seconds(server.pid), machine_busy_seconds()
    result = load(HOST, server.port, requests, concurrency, total)
    cpu = cpu_seconds(server.pid) - cpu0
    other = machine_busy_seconds() - busy0 - cpu - result.client_cpu_s
    run = Run(server.name, rnd, result, rss0, rss_mb(server.pid), cpu, max(0.0, other))
    log.info("  %-10s c=%-3d %7.1f req/s  p50 %7.1f  p99 %7.1f ms  errors %d  other load %.2f cores",
             server.name, concurrency, result.rps, result.p50_ms, result.p99_ms, result.errors,
             run.other_cpu_s / max(result.seconds, 1e-9))
    return run


def alternate(servers: list[Server], bodies: list[bytes], content_type: str,
              requests_at: dict[int, int], rounds: int,
              each_round: Callable[[int], object] | None = None) -> dict[str, dict[int, list[Run]]]:
    """Every (server, concurrency) measured `rounds` times, servers alternating within each round.
    `each_round(r)` runs first in every round (the in-process bound: same conditions as the servers)."""
    runs: dict[str, dict[int, list[Run]]] = {s.name: {c: [] for c in requests_at} for s in servers}
    prebuilt = {s.name: [build_request(HOST, s.port, PREDICT, b, content_type) for b in bodies]
                for s in servers}
    for rnd in range(rounds):
        order = servers if rnd % 2 == 0 else servers[::-1]
        log.info("round %d/%d", rnd + 1, rounds)
        if each_round is not None:
            each_round(rnd)
        for c, total in requests_at.items():
            for s in order:
                warm = min(total, max(2 * c, 8))
                runs[s.name][c].append(measure_once(s, prebuilt[s.name], c, total, rnd, warm))
    return runs


def summarise(name: str, concurrency: int, runs: list[Run]) -> Summary:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    n = sum(r.result.requests for r in runs) or 1
    secs = sum(r.result.seconds for r in runs) or 1e-9
    return Summary(
        server=name,
        concurrency=concurrency,
        rounds=len(runs),
        rps=med([r.result.rps for r in runs]),
        p50_ms=med([r.result.p50_ms for r in runs]),
        p90_ms=med([r.result.p90_ms for r in runs]),
        p99_ms=med([r.result.p99_ms for r in runs]),
        errors=sum(r.result.errors for r in runs),
        requests=sum(r.result.requests for r in runs),
        rss_before_mb=runs[0].rss_before_mb,
        rss_after_mb=runs[-1].rss_after_mb,
        server_cpu_ms=1000 * sum(r.server_cpu_s for r in runs) / n,
        client_cpu_ms=1000 * sum(r.result.client_cpu_s for r in runs) / n,
        other_cores=sum(r.other_cpu_s for r in runs) / secs,
        rps_runs=[round(r.result.rps, 2) for r in runs],
    )


def combine_bounds(bounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One bound per round -> medians (the per-run rates stay in `runs`)."""
    out = dict(bounds[0])
    for key in ("images_per_s", "decode_only_per_s", "infer_only_per_s", "cpu_ms_per_image",
                "closed_loop_per_s"):
        values = [b[key] for b in bounds if key in b]
        if values:
            out[key] = statistics.median(values)
    out["runs"] = [r for b in bounds for r in b["runs"]]
    out["closed_loop_runs"] = [b.get("closed_loop_per_s", float("nan")) for b in bounds]
    return out


def in_process_bound(checkpoint: Path, images: Path, count: int, batch: int, decode_threads: int,
                     torch_threads: int, precision: str = "fp32", repeats: int = 1,
                     device: str = "cpu", clients: int = 0, onnx: str | None = None) -> dict[str, Any]:
    """Run bench.inprocess in its own process (its own torch threads, no client in the way);
    `clients` > 0 also times its closed loop of that many images in flight; `onnx`: the exported
    file the service serves with ONNX Runtime."""
    cmd = [sys.executable, "-m", "bench.inprocess", "--checkpoint", str(checkpoint), "--images",
           str(images), "--count", str(count), "--batch", str(batch), "--decode-threads",
           str(decode_threads), "--torch-threads", str(torch_threads), "--precision", precision,
           "--repeats", str(repeats), "--components", "--device", device, "--clients", str(clients),
           *(["--onnx", onnx] if onnx else [])]
    busy0 = machine_busy_seconds()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process bound failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["machine_busy_s"] = machine_busy_seconds() - busy0
    log.info("  in-process bound: %.1f images/s (decode alone %.1f/s, inference alone %.1f/s)",
             out["images_per_s"], out.get("decode_only_per_s", 0), out.get("infer_only_per_s", 0))
    return out


def machine_peak(checkpoint: Path, threads: int, repeats: int = 5) -> dict[str, Any]:
    """bench.peak in its own process: the GEMM peak per precision on `threads` and the model's GFLOP
    per image (2 FLOPs per multiply-add), for the report's share-of-peak column."""
    cmd = [sys.executable, "-m", "bench.peak", "--checkpoint", str(checkpoint), "--threads", str(threads),
           "--repeats", str(repeats)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"peak measurement failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks = out["peak_gflops"]
    bf16 = "not measured (no bf16 hardware)" if peaks["bf16"] is None else f"{peaks['bf16']:.0f}"
    log.info("  peak matmul on %d thread(s): fp32 %.0f, bf16 %s GFLOP/s; model %.3f GFLOP/image", threads,
             peaks["fp32"], bf16, out["gflop_per_image"])
    return out
