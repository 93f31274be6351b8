"""Thin HTTP handlers; errors become JSON at the edge (handlers.py)."""

from __future__ import annotations

from fastapi import FastAPI

from service.routes import admin, explain, handlers, health, model, predict, ui

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
    }
)
WORK_ENDPOINTS = frozenset({"/v1/predict", "/v1/explain", "/v1/features", "/v1/model/reload"})


def install(app: FastAPI, ui_page: bool = True) -> None:
    for module in (predict, explain, model, admin, health):
        app.include_router(module.router)
    ui.install(app, ui_page)
    handlers.install(app)
