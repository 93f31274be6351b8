"""Thin HTTP handlers; errors become JSON at the edge (handlers.py)."""

from __future__ import annotations

from fastapi import FastAPI

from service.routes import admin, handlers, health, model, predict

ENDPOINTS = frozenset(
    {
        "/v1/predict",
        "/v1/model",
        "/v1/model/reload",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)
WORK_ENDPOINTS = frozenset({"/v1/predict", "/v1/model/reload"})


def install(app: FastAPI) -> None:
    for module in (predict, model, admin, health):
        app.include_router(module.router)
    handlers.install(app)
