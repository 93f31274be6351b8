#!/usr/bin/env python3
"""Write deploy/kubernetes/base/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The alert rules have one source (alerts.yml, unit-tested with promtool); the Prometheus Operator's
PrometheusRule carries the same groups. tests/deploy/test_kubernetes.py fails when they differ:
run `python scripts/k8s-rules.py` after editing alerts.yml.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "deploy/prometheus/alerts.yml"
TARGET = REPO / "deploy/kubernetes/base/prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/alerts.yml by scripts/k8s-rules.py: do not edit by hand.\n"


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "convserve"},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=110)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(REPO)}")
