"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.routes.handlers import error_response
from service.routes.openapi import HEALTHZ_RESPONSES, METRICS_RESPONSES, READYZ_RESPONSES
from service.state import get_state

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz", summary="Liveness: the process answers (also while warming up)", responses=HEALTHZ_RESPONSES
)
async def healthz(request: Request) -> JSONResponse:
    st = get_state(request)
    if st.failed:  # the process is stopping; an orchestrator should replace it
        return error_response(request, 503, "warmup_failed", st.failed)
    if st.device_failed:  # the process runs but can never serve again: restart it
        return error_response(request, 503, "device_failed", st.device_failed)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz", summary="Readiness: model loaded and warmed up, not draining", responses=READYZ_RESPONSES
)
async def readyz(request: Request) -> JSONResponse:
    st = get_state(request)
    if st.failed:  # checked first: a failed warm-up also drains (it stops the server)
        return error_response(request, 503, "warmup_failed", st.failed)
    if st.device_failed:
        return error_response(request, 503, "device_failed", st.device_failed)
    if st.draining:
        return error_response(request, 503, "shutting_down", "draining after SIGTERM; send no new work")
    if not st.ready:
        return error_response(request, 503, "not_ready", "the model is still warming up")
    return JSONResponse({"status": "ready", "model": st.predictor.model_ref()})


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses=METRICS_RESPONSES,
)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
