"""The benchmark must keep running: `python -m bench --quick` end to end, plus its small pure parts.

No timing assertions: on a shared 2-core machine any threshold would be flaky. What is asserted is
that every piece ran and produced well-formed numbers (requests answered, none failed, a bound
measured, a report written).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from bench.inputs import generate
from bench.loadgen import build_request, percentile, run_load
from bench.report import closed_loop_shares, of_bound_with_pairs

REPO = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--inputs", str(tmp_path / "inputs")],
        cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "| service |" in text and "| baseline |" in text and "In-process bound" in text
    assert "## Cold start and idle RSS (issue 10)" in text and "| convnet-64 |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    scenario = data["results"]["scenarios"]["convnet-64"]
    assert scenario["bound"]["images_per_s"] > 0
    # the bound runs with the batch thread count the service chose at warm-up
    chosen = json.loads(scenario["service_model"])["serving"]["torch_threads"]["batch"]
    assert scenario["bound"]["torch_threads"] == chosen
    by = {(s["server"], s["concurrency"]): s for s in scenario["summaries"]}
    assert set(by) == {(name, c) for name in ("service", "baseline") for c in (1, 4)}
    for s in by.values():
        assert s["errors"] == 0, s
        assert s["requests"] == scenario["requests_at"][str(s["concurrency"])]
        assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
        assert s["rss_after_mb"] > 0
    for info in scenario["servers"].values():
        assert info["cold_start_s"] > 0 and info["idle_rss_mb"] > 0
    # the extra back-to-back (bound, service) pair that the share-of-bound target also counts
    assert scenario["bound_pairs"]["clients"] == 4
    (pair,) = scenario["bound_pairs"]["pairs"]
    assert pair["bound"] > 0 and pair["service"] > 0
    # with it, the in-process closed loop of those clients (the service's batching without HTTP)
    assert pair["closed_loop"] > 0 and scenario["bound"]["closed_loop_per_s"] > 0
    assert scenario["bound"]["closed_loop_clients"] == 4


def test_share_of_bound_counts_the_rounds_and_the_extra_pairs_at_their_clients() -> None:
    sc = {
        "bound": {"runs": [100.0, 50.0]},
        "runs": [
            {"server": "service", "concurrency": 16, "round": 0, "rps": 90.0},
            {"server": "service", "concurrency": 16, "round": 1, "rps": 40.0},
            {"server": "baseline", "concurrency": 16, "round": 0, "rps": 10.0},
            {"server": "service", "concurrency": 1, "round": 0, "rps": 30.0},
        ],
        "bound_pairs": {
            "clients": 16,
            "pairs": [{"bound": 80.0, "service": 76.0}, {"bound": 0.0, "service": 5.0}],
        },
    }
    share, ratios, extra = of_bound_with_pairs(sc, 16)
    assert ratios == [0.9, 0.8, 0.95] and extra == 2  # a pair without a bound rate is no ratio
    assert share == 0.9
    assert of_bound_with_pairs(sc, 1) == (0.3, [0.3], 0)  # pairs run at 16 clients say nothing about 1


def test_closed_loop_shares_split_the_gap_into_http_and_in_flight_images() -> None:
    sc = {
        "bound": {"runs": [100.0, 50.0], "closed_loop_runs": [80.0, float("nan")]},
        "runs": [
            {"server": "service", "concurrency": 16, "round": 0, "rps": 72.0},
            {"server": "service", "concurrency": 16, "round": 1, "rps": 40.0},  # no loop that round
        ],
        "bound_pairs": {"clients": 16, "pairs": [{"bound": 60.0, "service": 45.0, "closed_loop": 50.0}]},
    }
    of_loop, loop_share = closed_loop_shares(sc, 16)
    assert of_loop == 0.9  # median of 72/80 and 45/50
    assert abs(loop_share - (0.8 + 50 / 60) / 2) < 1e-12  # median of 80/100 and 50/60
    nan_a, nan_b = closed_loop_shares({"bound": {"runs": [1.0]}, "runs": []}, 16)
    assert nan_a != nan_a and nan_b != nan_b  # never run: NaN, not a number made up


def test_inputs_are_reproducible(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", seed=3, quick=True)
    b = generate(tmp_path / "b", seed=3, quick=True)
    for name in a:
        assert [p.read_bytes() for p in a[name].paths] == [p.read_bytes() for p in b[name].paths]
    assert len(a["photo640"].paths) > 0 and len(a["small64"].paths) > 0
    assert generate(tmp_path / "a", seed=3, quick=True)["small64"].paths == a["small64"].paths  # reused


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_loadgen_counts_statuses_and_keeps_connections() -> None:
    """Against a tiny asyncio HTTP server: 200s and 500s, one connection per client."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                status = b"500 Internal Server Error" if body == b"bad" else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    async def scenario() -> tuple[int, int, dict[str, int]]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reqs = [build_request("127.0.0.1", port, "/x", b, "image/jpeg") for b in (b"good", b"bad")]
        async with server:
            res = await run_load("127.0.0.1", port, reqs, concurrency=3, total=30, keep_bodies=True)
        assert res.bodies == [b"ok"] * 30
        return res.requests, res.errors, res.statuses

    done, errors, statuses = asyncio.run(scenario())
    assert (done, errors) == (30, 15)
    assert statuses == {"200": 15, "500": 15}
    assert connections == 3
