"""`python -m bench startup`: cold start (spawn -> /readyz 200) and idle RSS, service vs baseline.

Each server is started alone (nothing else of ours runs meanwhile), measured, and stopped; within a
round the order is swapped every round, so slow drift on a shared machine lands on both sides. The
ratios the issue's targets are about are the medians of each round's own ratio (the service over the
baseline started right before or after it). `--service NAME=DIR` adds another service, started from a
different checkout (e.g. a `git worktree` of main), to compare before/after in the same run.

Round 0 is each service's first start on the checkpoint (its derived files cleared). One more round
follows: the derived files cleared again, `python -m service prepare` run first (timed: what a
Kubernetes init container adds to a pod's start), then the service, which starts as a later start.

Targets (issue 10): cold start at most 1.5x the baseline's, idle RSS at most the baseline's + 10%.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.servers import REPO, Server, baseline_server, service_server

log = logging.getLogger(__name__)
COLD_START_TARGET = 1.5  # x the baseline's spawn -> ready
RSS_TARGET = 1.10  # x the baseline's idle RSS


def measure(ckpts: dict[str, Path], env: dict[str, str], logs: Path, rounds: int, torch_threads: int = 0,
            device: str = "cpu", services: dict[str, Path] | None = None) -> dict[str, Any]:
    """{model: {"runs": [{round, server, cold_start_s, idle_rss_mb}], "summary": {...}}}."""
    trees = {"service": REPO, **(services or {})}
    out: dict[str, Any] = {}
    for model, ckpt in ckpts.items():
        runs: list[dict[str, Any]] = []
        prepared = rounds  # the round after the last: each service starts after `prepare`
        for rnd in range(rounds + 1):
            names = ["baseline", *trees]
            for name in names if rnd % 2 == 0 else names[::-1]:
                extra: dict[str, float] = {}
                if name == "baseline":
                    server = baseline_server(ckpt, torch_threads, logs, device)
                else:
                    if rnd in (0, prepared):  # a first start on this checkpoint, or one prepared for
                        for derived in ckpt.parent.glob(f"{ckpt.name}.*"):  # export, kept runtime choice
                            derived.unlink()
                    server = service_server(ckpt, env, logs, name=name)
                    server.cwd = trees[name]
                    if rnd == prepared:
                        extra["prepare_s"] = _prepare(server)
                runs.append({"round": rnd, "server": name, **extra, **_once(server)})
        out[model] = {"runs": runs, "summary": summarise(runs, prepared)}
    return out


def _prepare(server: Server) -> float:
    """`python -m service prepare` with the server's own settings, to exit; its wall time (s)."""
    argv = server.argv[:server.argv.index("--checkpoint") + 2]  # not --host/--port: it serves nothing
    start = time.perf_counter()
    done = subprocess.run([*argv[:3], "prepare", *argv[3:]], cwd=server.cwd, env=server.full_env(),
                          capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{server.name} prepare exited with {done.returncode}:\n{done.stderr[-2000:]}")
    log.info("%s prepare took %.1fs: %s", server.name, took, done.stdout.strip().splitlines()[-1])
    return took


def _once(server: Server) -> dict[str, float]:
    server.start()
    try:
        return {"cold_start_s": server.cold_start_s, "idle_rss_mb": server.idle_rss_mb,
                "settled_s": server.settled_s}
    finally:
        server.stop()


def summarise(runs: list[dict[str, Any]], prepared: int | None = None) -> dict[str, dict[str, float]]:
    """Per server: median cold start, runtime settled and idle RSS, the median over rounds of each
    round's ratio to the baseline's, and round 0's ratios alone (`first_*`: a service's first start
    on the checkpoint, which exports and times its runtime candidate; later rounds read what it
    kept). Round `prepared` (the service started after `python -m service prepare`) is kept out
    of the medians and summarised alone (`prepared_*`, with `prepared_prepare_s`)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["server"]] = r
    special = by_round.pop(prepared, {}) if prepared is not None else {}
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["server"] for r in runs):
        mine = [r for r in runs if r["server"] == name and r["round"] != prepared]
        row = {key: statistics.median(r.get(key, float("nan")) for r in mine)
               for key in ("cold_start_s", "idle_rss_mb", "settled_s")}
        for key, ratio in (("cold_start_s", "cold_start_x"), ("idle_rss_mb", "idle_rss_x")):
            pairs = [d[name][key] / d["baseline"][key] for d in by_round.values()
                     if name in d and "baseline" in d and d["baseline"][key]]
            row[ratio] = statistics.median(pairs) if pairs else float("nan")
        for pre, one in (("first_", by_round[min(by_round)]), ("prepared_", special)):
            _alone(row, pre, one, name)
        out[name] = row
    return out


def _alone(row: dict[str, float], pre: str, one: dict[str, dict[str, Any]], name: str) -> None:
    """One round's figures for `name` and its ratios to that round's baseline, as `pre`-keys."""
    mine, base = one.get(name, {}), one.get("baseline", {})
    for key, ratio in (("cold_start_s", "cold_start_x"), ("idle_rss_mb", "idle_rss_x")):
        row[f"{pre}{key}"] = mine.get(key, float("nan"))
        row[f"{pre}{ratio}"] = mine[key] / base[key] if key in mine and base.get(key) else float("nan")
    for key in ("settled_s", "prepare_s"):
        row[f"{pre}{key}"] = mine.get(key, float("nan"))


def render(res: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    lines = [
        "# Cold start and idle RSS: service vs baseline",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; load average at start "
        f"{machine['loadavg_start']}",
        "",
        "Each server started alone, spawn -> first /readyz 200 (cold start); `runtime settled`: spawn "
        "-> /v1/model no longer says the runtime choice is pending (a first start's trial, after ready); "
        "RSS 0.5 s after that; order swapped every round; `x baseline` = median of the per-round "
        "ratios; the first-start row is round 0 alone (the export and the runtime trial happen there).",
        "",
    ]
    lines += table(res)
    return "\n".join(lines) + "\n"


def table(res: dict[str, Any]) -> list[str]:
    lines = [
        f"| model | server | rounds | cold start s | x baseline (target ≤ {COLD_START_TARGET}) "
        f"| runtime settled s | idle RSS MiB | x baseline (target ≤ {RSS_TARGET:.2f}) | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, m in res.items():
        # the prepared round is a row of its own, not one of the rounds
        rounds = len({r["round"] for r in m["runs"]}) - any("prepare_s" in r for r in m["runs"])
        for name, s in m["summary"].items():
            rows = [(name, rounds, "")]
            if name != "baseline":
                rows.append((f"{name}, first start (round 0)", 1, "first_"))
                took = s.get("prepared_prepare_s", float("nan"))
                if took == took:  # not NaN: there was a prepared round
                    rows.append((f"{name}, after `prepare` ({took:.1f} s)", 1, "prepared_"))
            for label, n, pre in rows:
                cx, rx = s[f"{pre}cold_start_x"], s[f"{pre}idle_rss_x"]
                met = "" if name == "baseline" else (
                    "yes" if cx <= COLD_START_TARGET and rx <= RSS_TARGET else "NO")
                settled = s.get(f"{pre}settled_s", float("nan"))
                lines.append(
                    f"| {model} | {label} | {n} | {s[f'{pre}cold_start_s']:.1f} | {cx:.2f} "
                    f"| {settled:.1f} | {s[f'{pre}idle_rss_mb']:.0f} | {rx:.2f} | {met} |"
                )
    return lines


def scenario_section(results: dict[str, Any]) -> list[str]:
    """For `python -m bench`'s report: each scenario's single start of each server against the
    targets (one sample each: `python -m bench startup` measures them in alternating rounds)."""
    lines = ["", "## Cold start and idle RSS (issue 10)", "",
             "One start per server and scenario (servers started one at a time); "
             "`python -m bench startup` repeats it in alternating rounds.", "",
             "| scenario | service cold start s | baseline s | x baseline | service idle RSS MiB "
             "| baseline MiB | x baseline | met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, sc in results.get("scenarios", {}).items():
        s, b = sc["servers"].get("service"), sc["servers"].get("baseline")
        if not s or not b:
            continue
        cx = s["cold_start_s"] / b["cold_start_s"] if b["cold_start_s"] else float("nan")
        rx = s["idle_rss_mb"] / b["idle_rss_mb"] if b["idle_rss_mb"] else float("nan")
        met = "yes" if cx <= COLD_START_TARGET and rx <= RSS_TARGET else "NO"
        lines.append(f"| {key} | {s['cold_start_s']:.1f} | {b['cold_start_s']:.1f} | {cx:.2f} "
                     f"| {s['idle_rss_mb']:.0f} | {b['idle_rss_mb']:.0f} | {rx:.2f} | {met} |")
    return lines
