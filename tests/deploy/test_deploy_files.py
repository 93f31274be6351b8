"""The shipped deployment files, checked by the real tools and against each other.

Each tool-backed test skips with a reason when the tool is missing and fails when CI is set
(scripts/ci-tools.sh installs promtool and docker-compose; hadolint comes from the dev extras).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.promstack import (
    DASHBOARD,
    PROMETHEUS_DIR,
    REPO,
    alert_exprs,
    alert_rules,
    dashboard,
    dashboard_exprs,
    panels,
)
from tests.tooling import require_tool

COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker-compose.gpu.yml"]
DOCKERFILES = sorted(p for p in REPO.glob("Dockerfile*") if p.is_file())
GRAFANA = REPO / "deploy" / "grafana"


def run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


# --- Dockerfile -------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    result = run([hadolint, "--no-color", str(dockerfile)])
    # Every rule we do not follow is ignored inline with the reason next to it.
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_promises() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-\S+$", text, re.M)
    assert "EXPOSE 8000" in text
    # non-root, numeric
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # HEALTHCHECK in shell form (stored as CMD-SHELL) against /healthz, with no curl in the image
    health = re.search(r"^HEALTHCHECK .*?\n\s+CMD (.+)$", text, re.M)
    assert health and not health.group(1).startswith("["), "HEALTHCHECK must use the shell form"
    assert "/healthz" in health.group(1) and "curl" not in health.group(1)
    # configuration through CONVSERVE_* only, the checkpoint at the documented path
    assert "CONVSERVE_CHECKPOINT=/models/model.safetensors" in text
    assert re.search(r'^CMD \["python", "-m", "service"\]$', text, re.M)
    assert not re.search(r"^ENTRYPOINT", text, re.M), (
        "`docker run IMAGE python -m training` needs no entrypoint"
    )


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing enters the context unless named"
    for needed in ("pyproject.toml", "README.md", "model/", "training/", "service/"):
        assert f"!{needed}" in lines
    for line in re.findall(r"^COPY (.+)$", (REPO / "Dockerfile").read_text(), re.M):
        words = line.split()
        if any(w.startswith("--from") for w in words):
            continue  # from another stage, not the context
        for src in [w for w in words if not w.startswith("--")][:-1]:
            if "$" not in src:
                assert f"!{src.rstrip('/')}/" in lines or f"!{src}" in lines, f"{src} is COPY'd but ignored"


# --- docker-compose ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files",
    [COMPOSE_FILES[:1], COMPOSE_FILES],
    ids=["compose", "compose+gpu"],
)
def test_docker_compose_v1_accepts_the_files(files: list[Path]) -> None:
    tool = require_tool("docker-compose")
    args = [tool]
    for f in files:
        args += ["-f", str(f)]
    result = run([*args, "config", "-q"])
    assert result.returncode == 0, result.stderr


def test_compose_shape() -> None:
    doc = compose()
    assert not {"name", "develop"} & set(doc), "top-level keys docker-compose v1 rejects"
    services = doc["services"]
    assert {"convserve", "train", "prometheus", "grafana"} <= set(services)
    assert services["train"]["profiles"] == ["train"], "training is one-shot, behind a profile"
    assert services["train"]["entrypoint"][:3] == ["python", "-m", "training"]
    # the trainer writes where the server reads
    train_out = services["train"]["entrypoint"][services["train"]["entrypoint"].index("--out") + 1]
    checkpoint = services["convserve"]["environment"]["CONVSERVE_CHECKPOINT"]
    assert checkpoint == f"{train_out}/model.safetensors"
    shared = {v.split(":")[0] for v in services["convserve"]["volumes"]}
    assert shared & {v.split(":")[0] for v in services["train"]["volumes"]}
    # configuration through CONVSERVE_* only
    assert all(k.startswith("CONVSERVE_") for k in services["convserve"]["environment"])


def test_compose_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_gpu_override_reserves_a_gpu() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    for name in ("convserve", "train"):
        service = doc["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert service["build"]["args"]["VARIANT"] == "cuda"


# --- Prometheus -------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run([require_tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run([require_tool("promtool"), "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    result = run([require_tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never shown to fire"
    # a healthy series keeps each alert quiet (for the labelled per-replica alerts a healthy
    # replica beside the failing one in the same test plays that part)
    assert names - quiet - {"ConvserveNotReady"} == set(), "alerts never shown to stay quiet"


def test_alerts_cover_the_failure_modes() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    exprs = " ".join(r["expr"] for r in rules.values())
    for needed in (
        "up{",
        'code=~"5..',
        "histogram_quantile(0.99",
        "convserve_queue_limit",
        "convserve_rejected_images_total",
        "convserve_gpu_memory_total_bytes",
        "convserve_gpu_memory_reserved_bytes",  # this replica's allocator, not other processes
    ):
        assert needed in exprs
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    """promtool parses each dashboard query (after Grafana's variable expansion) and each alert."""
    exprs = dashboard_exprs() + alert_exprs()
    rules = {
        "groups": [
            {
                "name": "parse-check",
                "rules": [{"record": f"check:expr_{i}", "expr": e.promql} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([require_tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


# --- Grafana ----------------------------------------------------------------------------------


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/convserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == path
    assert (REPO / "deploy/grafana/dashboards" / DASHBOARD.name).exists()
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/{DASHBOARD.name}"

    dash = dashboard()
    uids = {p["datasource"]["uid"] for p in panels(dash) if p["type"] != "row"} | {
        t["datasource"]["uid"] for p in panels(dash) for t in p.get("targets", [])
    }
    assert uids == {ds["uid"]}, "every panel must use the provisioned data source"


def test_dashboard_has_the_promised_panels() -> None:
    dash = dashboard()
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
    promql = " ".join(e.promql for e in dashboard_exprs())
    for metric in (
        "convserve_requests_total",  # request rate by status
        "convserve_stage_duration_seconds_bucket",  # latency percentiles by stage
        "convserve_request_duration_seconds_bucket",
        "convserve_batch_size_bucket",  # batch size distribution
        "convserve_queue_depth",
        "convserve_queue_limit",
        "convserve_rejected_images_total",  # by reason
        "convserve_predictions_total",  # by label
        "convserve_top1_confidence_bucket",  # confidence
        "convserve_model_info",
        "convserve_gpu_memory_used_bytes",
    ):
        assert metric in promql, metric
    assert "sum by (code)" in promql or "sum by (endpoint, code)" in promql
    assert "sum by (stage, le)" in promql and "sum by (label)" in promql
    assert "sum by (protocol, reason)" in promql


def test_docs_give_the_published_urls() -> None:
    docs = (REPO / "docs" / "deployment.md").read_text()
    services = compose()["services"]
    for name in ("lb", "prometheus", "grafana"):
        (port,) = services[name]["ports"]
        port = re.sub(r"\$\{\w+:-(\d+)\}", r"\1", port)  # ${VAR:-8000} -> 8000
        host_port = port.rsplit(":", 1)[0].rsplit(":", 1)[-1]  # [ip:]host:container
        assert f"http://localhost:{host_port}" in docs, name
    for probe in ("/readyz", "/healthz"):
        assert f"path: {probe}" in docs, "the Kubernetes probe mapping"
