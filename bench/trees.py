"""`python -m bench trees`: the service from several checkouts and the baseline, in one run.

For a change's before/after (`--service before=DIR`, DIR e.g. a `git worktree` of main): every
server is started once and kept up; each round runs every concurrency on every server, the server
order rotated round by round, so slow drift and bursts of interference on a shared machine land on
all of them. The table gives medians and the median of each round's own ratio (throughput, or p50 at
one client) to the baseline and to the first `--service`, which is the number a change is judged by.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from bench.inputs import ImageSet
from bench.loadgen import LoadResult, build_request, load
from bench.measure import HOST, PREDICT
from bench.servers import REPO, Server, baseline_server, service_server

log = logging.getLogger(__name__)


def key_of(clients: int) -> str:
    """What a concurrency is judged by: a lone client's latency, otherwise throughput."""
    return "p50_ms" if clients == 1 else "rps"


def compare(ckpt: Path, images: ImageSet, env: dict[str, str], logs: Path, trees: dict[str, Path],
            requests_at: dict[int, int], rounds: int, torch_threads: int = 0) -> dict[str, Any]:
    """{"servers": [...], "rows": {clients: {server: {median, per_round, vs_baseline, vs_first}}}}."""
    servers: list[Server] = []
    try:
        for name, tree in (trees or {"service": REPO}).items():
            server = service_server(ckpt, env, logs, name=name)
            server.cwd = tree
            servers.append(server.start())
        servers.append(baseline_server(ckpt, torch_threads, logs).start())
        files = images.load()
        reqs = {s.name: [build_request(HOST, s.port, PREDICT, b, "image/jpeg") for b in files]
                for s in servers}
        runs: dict[int, dict[str, list[LoadResult]]] = {c: {s.name: [] for s in servers} for c in requests_at}
        for rnd in range(rounds):
            order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
            for c, total in requests_at.items():
                for s in order:
                    load(HOST, s.port, reqs[s.name], c, max(4 * c, 8))  # warm the connections
                    res = load(HOST, s.port, reqs[s.name], c, total)
                    runs[c][s.name].append(res)
                    log.info("  round %d %-10s c=%-3d %7.1f req/s  p50 %.2f ms  errors %d", rnd, s.name, c,
                             res.rps, res.p50_ms, res.errors)
        return {"servers": [s.name for s in servers], "rounds": rounds, "images": images.name,
                "rows": {c: summarise(r, key_of(c)) for c, r in runs.items()}}
    finally:
        for s in servers:
            s.stop()


def summarise(runs: dict[str, list[LoadResult]], key: str) -> dict[str, dict[str, Any]]:
    """Per server: the median, every round's value, and the medians of its per-round ratios to the
    baseline and to the first server (the 'before' of a comparison)."""
    names = list(runs)
    first = names[0]
    out: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        values = [getattr(r, key) for r in results]

        def ratio(other: str, values: list[float] = values) -> float:
            pairs = [v / getattr(o, key) for v, o in zip(values, runs[other], strict=True) if getattr(o, key)]
            return statistics.median(pairs) if pairs else float("nan")

        out[name] = {"median": statistics.median(values), "per_round": values,
                     "vs_baseline": ratio("baseline"), "vs_first": ratio(first),
                     "errors": sum(r.errors for r in results)}
    return out


def render(res: dict[str, Any], what: str, command: str, machine: dict[str, Any]) -> str:
    first = res["servers"][0]
    lines = [f"# Service checkouts side by side ({what})", "", f"Command: `{command}`  ",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores", "",
             f"Rounds: {res['rounds']}, server order rotated each round. 1 client: p50 ms (lower is "
             f"better); more clients: req/s. Ratios are medians of each round's own ratio.", "",
             f"| clients | server | median | x baseline | x {first} | per round | errors |",
             "|---:|---|---:|---:|---:|---|---:|"]
    for c, row in res["rows"].items():
        for name, r in row.items():
            per = ", ".join(f"{v:.2f}" if c == 1 else f"{v:.1f}" for v in r["per_round"])
            lines.append(f"| {c} | {name} | {r['median']:.2f} | {r['vs_baseline']:.3f} | {r['vs_first']:.3f} "
                         f"| {per} | {r['errors']} |")
    return "\n".join(lines) + "\n"
