"""The dashboard and the alert rules against a real Prometheus scraping a real service.

One module-scoped scenario (it takes seconds, not minutes): start the service with the tiny model,
start Prometheus with the shipped configuration pointed at it, send traffic in two rounds (so every
counter and histogram has an increase inside the rate window), then check that every dashboard
query returns data and every alert rule evaluates cleanly and stays quiet on the healthy service.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.conftest import LiveServer, free_port, run_server
from tests.deploy.promstack import (
    ALERTS,
    Expr,
    Prometheus,
    alert_exprs,
    alert_rules,
    dashboard_exprs,
    finite_values,
    metric_names,
    run_prometheus,
    scrape_config_for,
)
from tests.tooling import require_tool

# Series that only a CUDA replica exports (metrics.py's GPU collector).
GPU_ONLY = {
    "convserve_gpu_memory_used_bytes",
    "convserve_gpu_memory_total_bytes",
    "convserve_gpu_memory_allocated_bytes",
    "convserve_gpu_memory_reserved_bytes",
    "convserve_gpu_metrics_errors_total",
}


@dataclass
class Stack:
    server: LiveServer
    prom: Prometheus
    exposition: str  # the service's /metrics text after the traffic
    device: str


def send_traffic(client: httpx.Client, good: int) -> None:
    """Good images (some concurrently, so batches form) plus one of each common rejection."""

    def predict(i: int) -> None:
        body = images.jpeg((64 + 16 * (i % 4), 64)) if i % 2 else images.png("RGB")
        r = client.post(
            "/v1/predict", content=body, headers={"Content-Type": "image/png" if i % 2 == 0 else "image/jpeg"}
        )
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(predict, range(good)))
    bad = client.post("/v1/predict", content=images.garbage(), headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "corrupt_image"
    odd = client.post("/v1/predict", content=images.text_file(), headers={"Content-Type": "text/plain"})
    assert odd.status_code == 415, odd.text


def scraped_total(prom: Prometheus) -> float:
    result = prom.query('sum(convserve_requests_total{job="convserve", endpoint="/v1/predict"})')
    return float(result[0]["value"][1]) if result else -1.0


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus")
    require_tool("promtool")
    tmp = tmp_path_factory.mktemp("promstack")
    with run_server(tiny_checkpoint, tmp, max_batch_wait_ms=20) as server:
        config = scrape_config_for(f"127.0.0.1:{server.port}", ALERTS)
        with run_prometheus(prometheus, config, tmp, free_port()) as prom:
            # round 1 creates every labelled series; wait until Prometheus has seen it
            send_traffic(server.client, good=16)
            prom.wait_for("first traffic scraped", lambda: scraped_total(prom) >= 18)
            # round 2 gives every series an increase between two scrapes inside the rate window
            before = scraped_total(prom)
            send_traffic(server.client, good=16)
            prom.wait_for("second traffic scraped", lambda: scraped_total(prom) >= before + 18)
            exposition = server.client.get("/metrics").text
            info = prom.query("convserve_model_info")
            device = info[0]["metric"]["device"] if info else "unknown"
            yield Stack(server, prom, exposition, device)


def exposed_names(exposition: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {s.name for s in family.samples}
    return names


@pytest.mark.parametrize("expr", dashboard_exprs(), ids=lambda e: e.source)
def test_dashboard_query_returns_data(stack: Stack, expr: Expr) -> None:
    if metric_names(expr.promql) & GPU_ONLY and not stack.device.startswith("cuda"):
        result = stack.prom.query(expr.promql)  # still a valid query...
        assert result == [], "...and empty: a CPU replica exports no GPU series"
        return
    result = stack.prom.wait_for(
        f"{expr.source} to return a finite value",
        lambda: finite_values(stack.prom.query(expr.promql)),
        timeout=15,
    )
    assert result, expr.promql


def test_every_metric_the_files_use_is_exported(stack: Stack) -> None:
    """A typo in a metric name gives an empty panel or an alert that can never fire: catch it."""
    exported = exposed_names(stack.exposition) | {"up"}
    used: set[str] = set()
    for expr in dashboard_exprs() + alert_exprs():
        used |= metric_names(expr.promql)
    assert used - exported - GPU_ONLY == set()


def test_alert_rules_evaluate_and_stay_quiet_on_a_healthy_service(stack: Stack) -> None:
    prom = stack.prom

    def evaluated() -> list[dict]:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        # a rule not evaluated yet reports the zero time and health "unknown"
        done = all(not r["lastEvaluation"].startswith("0001") and r["health"] != "unknown" for r in rules)
        return rules if rules and done else []

    rules = prom.wait_for("every rule evaluated", evaluated, timeout=15)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        assert rule["state"] == "inactive", f"{rule['name']} is {rule['state']} on a healthy service"
    assert prom.api("alerts")["alerts"] == []
    # each alert expression also runs as a plain query (what an operator pastes into the UI)
    for expr in alert_exprs():
        result = prom.query(expr.promql)
        assert result == [], f"{expr.source} matches on a healthy service: {result}"
