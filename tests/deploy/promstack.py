"""The shipped monitoring files as data, and a real Prometheus process to query them against.

Grafana expands its own variables before a query reaches Prometheus; `grafana_to_promql` does the
same with the values Grafana would use for a 1 s scrape interval, so the text sent here is what
Prometheus would receive from the dashboard.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "convserve.json"
ALERTS = PROMETHEUS_DIR / "alerts.yml"

# Grafana's built-in variables and the dashboard's own, as Grafana would expand them.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "5s",
    "__range": "5m",
    "instance": ".*",  # the "All" value of the instance variable (allValue in the dashboard)
}


@dataclass(frozen=True)
class Expr:
    source: str  # "panel 'Title' A" or "alert Name"
    promql: str


def grafana_to_promql(expr: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"dashboard uses an unknown variable ${name}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels folded inside a collapsed row


def dashboard_exprs() -> list[Expr]:
    out = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            source = f"panel {panel['title']!r} {target['refId']}"
            out.append(Expr(source, grafana_to_promql(target["expr"])))
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_exprs() -> list[Expr]:
    return [Expr(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


def metric_names(promql: str) -> set[str]:
    """Metric names an expression reads. Every selector in the shipped files has a {...} matcher."""
    return set(re.findall(r"([a-zA-Z_:][\w:]*)\{", promql))


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log
        self.client = httpx.Client(base_url=url, timeout=10)

    def api(self, path: str, **params: str) -> Any:
        r = self.client.get(f"/api/v1/{path}", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {r.status_code} {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, what: str, predicate: Any, timeout: float = 40.0) -> Any:
        """Poll until predicate() returns something truthy; return it. No fixed sleeps."""
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text(errors='replace')}")
            value = predicate()
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.25)


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def scrape_config_for(target: str, rule_file: Path) -> dict[str, Any]:
    """The shipped prometheus.yml with the convserve job pointed at `target` and 1 s intervals.

    Only what cannot work outside compose changes: discovery by the compose service name becomes a
    static target. Job name, metrics path and rule files stay as shipped.
    """
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rule_file)]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "convserve":
            job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
            job["scrape_interval"] = "1s"
            job["static_configs"] = [{"targets": [target]}]
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@contextmanager
def run_prometheus(binary: str, config: dict[str, Any], tmp: Path, port: int) -> Iterator[Prometheus]:
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:

        def ready() -> bool:
            try:
                return prom.client.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        prom.wait_for("prometheus /-/ready", ready, timeout=20)
        yield prom
    finally:
        prom.client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
