"""Thin HTTP handlers; errors become JSON at the edge (handlers.py)."""

from __future__ import annotations

from fastapi import FastAPI

from service.routes import admin, explain, handlers, health, model, predict, ui, v2

ENDPOINTS = frozenset(
    {
        "/v1/predict",
        "/v1/explain",
        "/v1/features",
        "/v1/model",
        "/v1/model/samples.png",
        "/",
        "/v1/model/reload",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
    }
)
# /v2/models/... paths are labelled by template (service.protocols.endpoint_label); both infer
# templates are work, counted in flight and waited for by the drain.
WORK_ENDPOINTS = frozenset(
    {
        "/v1/predict",
        "/v1/model/reload",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v1/explain",
        "/v1/features",
    }
)


def install(app: FastAPI, ui_page: bool = True) -> None:
    # The two inference routers first, in this order: FastAPI tries routes in order, so every router
    # ahead of an inference path costs each request a walk of its routes (see routes/v2.py).
    for module in (predict, v2, explain, model, admin, health):
        app.include_router(module.router)
    ui.install(app, ui_page)
    handlers.install(app)
