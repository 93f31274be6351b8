"""The Kubernetes manifests: every overlay renders, validates against the Kubernetes schemas, and
agrees with the service (probe paths are real routes, ports and the grace period fit the drain).
No cluster runs here: `kubectl kustomize` renders offline and `kubernetes-validate` checks the core
kinds against bundled schemas; the CRDs (ServiceMonitor, PrometheusRule, InferenceService) are
checked structurally."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from tests.conftest import REPO
from tests.tooling import require_tool

K8S = REPO / "deploy/kubernetes"
OVERLAYS = ["cpu", "gpu", "cpu-queue-depth"]
CORE_KINDS = {
    "Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget", "HorizontalPodAutoscaler"
}


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def routes(tiny_checkpoint: Path) -> set[str]:
    app = create_app(Settings(checkpoint=tiny_checkpoint))  # routes only: the lifespan never runs
    return set(app.openapi()["paths"])


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def test_overlay_renders_every_object(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    assert {d["kind"] for d in docs} == CORE_KINDS | {"ServiceMonitor", "PrometheusRule"}


def test_core_objects_validate_against_kubernetes_schemas(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate as kv

    _, docs = overlay
    for doc in docs:
        if doc["kind"] in CORE_KINDS:  # strict: an unknown or misspelled field is an error
            kv.validate(doc, kv.latest_version(), strict=True)


def test_probes_ports_and_grace_period_agree_with_the_service(
    overlay: tuple[str, list[dict[str, Any]]], tiny_checkpoint: Path
) -> None:
    name, docs = overlay
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    settings = Settings(checkpoint=tiny_checkpoint, **{
        k.removeprefix("CONVSERVE_").lower(): v
        for k, v in env.items()
        if k in ("CONVSERVE_PORT", "CONVSERVE_DRAIN_DELAY_S", "CONVSERVE_GRACE_PERIOD_S")
    })
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port == 8000
    assert env["CONVSERVE_HOST"] == "0.0.0.0"  # reachable from the kubelet and the Service
    paths = routes(tiny_checkpoint)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 while warming or draining
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"  # 200 while warming
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
        assert container[probe]["httpGet"]["port"] == port["name"]
    # kubelet sends SIGKILL after the grace period: it must cover the drain delay and the grace.
    assert pod["terminationGracePeriodSeconds"] >= settings.drain_delay_s + settings.grace_period_s + 5
    assert settings.drain_delay_s > 0  # endpoints are removed asynchronously: keep listening a moment
    service = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    # The Service and PDB select the Deployment's pods.
    labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        doc = by_kind(docs, kind)
        selector = doc["spec"]["selector"] if kind == "Service" else doc["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), (kind, selector, labels)
    assert env["CONVSERVE_DEVICE"] == ("cuda" if name == "gpu" else "cpu")  # gpu: fail fast without one
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (name == "gpu")


def test_pods_run_non_root_on_a_read_only_root_filesystem(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert "/tmp" in mounts  # matplotlib's and torch's caches (MPLCONFIGDIR, XDG_CACHE_HOME) go there
    env = env_of(container)
    assert env["MPLCONFIGDIR"].startswith("/tmp/") and env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert env["CONVSERVE_CHECKPOINT"].startswith("/models/")


# What `python -m service prepare` ignores: the rest of the server's CONVSERVE_* settings must reach
# the init container unchanged, or the decision it keeps has another key than the server looks up.
SERVING_ONLY = {"CONVSERVE_HOST", "CONVSERVE_PORT", "CONVSERVE_DRAIN_DELAY_S", "CONVSERVE_GRACE_PERIOD_S",
                "CONVSERVE_WATCH_CHECKPOINT"}


def test_cpu_pods_decide_the_runtime_in_an_init_container_with_the_servers_settings(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    if name == "gpu":  # nothing to decide on a GPU (torch is its only runtime)
        assert "initContainers" not in pod
        return
    (server,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert init["name"] == "prepare" and init["args"] == ["python", "-m", "service", "prepare"]
    assert init["image"] == server["image"]
    ours, theirs = env_of(init), env_of(server)
    assert {k: v for k, v in theirs.items() if k.startswith("CONVSERVE_") and k not in SERVING_ONLY} == {
        k: v for k, v in ours.items() if k.startswith("CONVSERVE_")}
    assert theirs.keys() >= SERVING_ONLY  # the exemptions are real settings the server is given
    assert init["resources"] == server["resources"]  # the same cores: the decision is per core count
    assert init["securityContext"] == server["securityContext"]
    # the decision goes to /tmp (the checkpoint's folder is read-only), which the server reads
    assert {(m["name"], m["mountPath"], m.get("readOnly", False)) for m in init["volumeMounts"]} == {
        (m["name"], m["mountPath"], m.get("readOnly", False)) for m in server["volumeMounts"]}
    assert "CONVSERVE_EXPORT_CACHE_DIR" not in ours  # both use the default, $TMPDIR's folder


def test_service_monitor_scrapes_metrics_as_job_convserve(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    monitor = by_kind(docs, "ServiceMonitor")
    service = by_kind(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == service["spec"]["ports"][0]["name"]
    # The alert rules and the dashboard select job="convserve": the job label comes from the Service.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "convserve"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_prometheus_rule_carries_exactly_the_alert_rules(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    rule = by_kind(docs, "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "run: python scripts/k8s-rules.py"


def test_queue_depth_overlay_switches_the_hpa_to_the_custom_metric() -> None:
    docs = render(K8S / "overlays/cpu-queue-depth")
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "convserve_queue_depth"
    rule = yaml.safe_load((K8S / "components/queue-depth-hpa/adapter-rule.yaml").read_text())
    assert "convserve_queue_depth" in rule[0]["seriesQuery"]


def test_kserve_inference_service_speaks_v2_and_probes_readiness_over_http(tiny_checkpoint: Path) -> None:
    isvc = yaml.safe_load((K8S / "kserve/inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    env = env_of(container)
    assert env["PROTOCOL"] == "v2"
    (port,) = container["ports"]
    assert str(port["containerPort"]) == env["CONVSERVE_PORT"]
    ready = container["readinessProbe"]["httpGet"]
    assert ready == {"path": "/v2/health/ready", "port": port["containerPort"]}  # not the TCP default
    paths = routes(tiny_checkpoint)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
    grace = float(env["CONVSERVE_DRAIN_DELAY_S"]) + float(env["CONVSERVE_GRACE_PERIOD_S"])
    assert predictor["terminationGracePeriodSeconds"] >= grace + 5
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(env["CONVSERVE_CHECKPOINT"]).parent) in mounts
    # The pod template inside is a real PodSpec: validate it as one (wrapped in a Pod).
    import kubernetes_validate as kv

    pod_spec = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")}
    kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec},
                kv.latest_version(), strict=True)
