"""The Open Inference Protocol v2 over HTTP/REST: health, metadata and infer (wire format: protocols/v2).

The infer route reads the raw body: tritonclient sends no Content-Type header, and the binary
extension's body is JSON followed by raw tensor bytes.
"""

from __future__ import annotations

import functools
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import pipeline
from service.http_errors import ServiceError
from service.inputs import read_body
from service.predictor import Predictor
from service.protocols import v2
from service.routes.openapi import (
    V2_LIVE_RESPONSES,
    V2_MODEL_READY_RESPONSES,
    V2_MODEL_RESPONSES,
    V2_READY_RESPONSES,
    V2_RESPONSES,
    V2_SERVER_RESPONSES,
    v2_infer_body,
)
from service.state import ServiceState, get_state

router = APIRouter(tags=["v2 (Open Inference Protocol)"])
HEADER_LENGTH = "Inference-Header-Content-Length"


@functools.cache
def _server_version() -> str:
    """The installed package's version, looked up on first use: importlib.metadata reads every
    installed distribution's metadata (40 ms of cold start in a full environment)."""
    try:
        return version("convserve")
    except PackageNotFoundError:  # running from a source tree without the package installed
        return "0"


def _model(st: ServiceState, name: str, model_version: str | None) -> Predictor:
    """The served model if it is the one named (and versioned); 404 otherwise."""
    p = st.predictor
    if name != p.name:
        raise ServiceError("not_found", f"unknown model {name!r}; this server serves {p.name!r}", 404)
    if model_version is not None and model_version != p.version:
        message = f"model {name!r} has no version {model_version!r}; the ready version is {p.version!r}"
        raise ServiceError("not_found", message, 404)
    return p


def _unready(st: ServiceState) -> ServiceError | None:
    if st.device_failed:
        return ServiceError("device_failed", st.device_failed)
    if st.failed:
        return ServiceError("warmup_failed", st.failed)
    if st.draining:
        return ServiceError(
            "shutting_down", "draining after SIGTERM; send no new work", headers=pipeline.RETRY
        )
    if not st.ready:
        return ServiceError("not_ready", "the model is still warming up", headers=pipeline.RETRY)
    return None


# The per-request cost of /v2 infer over /v1's raw route, kept off the hot path (measured):
# - the infer routes are registered first, and routes.install puts this router right after /v1's:
#   FastAPI tries routes in order, and walking the other /v2 templates cost ~50 us per request;
# - the path parameters are read from the scope (Starlette's router has already extracted them),
#   not declared: FastAPI resolves every declared parameter per request through its type
#   introspection and pydantic, tens of microseconds for two plain strings. v2_infer_body
#   documents them instead.
# (The lower decorator registers first: the unversioned path, the common one, is tried first.)
@router.post(
    "/v2/models/{name}/versions/{model_version}/infer",
    summary="Inference on one model version",
    openapi_extra=v2_infer_body("name", "model_version"),
    responses=V2_RESPONSES,
    response_class=Response,
)
@router.post(
    "/v2/models/{name}/infer",
    summary="Inference (JSON, or JSON + binary tensors)",
    openapi_extra=v2_infer_body("name"),
    responses=V2_RESPONSES,
    response_class=Response,
)
async def infer(request: Request) -> Response:
    st = get_state(request)
    s = st.settings
    start = time.perf_counter()
    path: dict[str, str] = request.scope["path_params"]
    p = _model(st, path["name"], path.get("model_version"))
    body = await read_body(request, s.max_upload_bytes)
    parsed = v2.parse_infer(
        body,
        request.headers.get(HEADER_LENGTH),
        input_shape=p.input_shape,
        max_images=s.max_images_per_request,
        num_classes=len(p.labels),
    )
    outcome = await pipeline.infer(
        st,
        parsed.entries,
        protocol="v2",
        receive=request.receive,
        start=start,
        top_k=parsed.top_k,
        all_probs=parsed.all_probs,
        all_or_nothing=True,  # the protocol has no per-item errors
        request_id=request.scope.get("state", {}).get("request_id"),
    )
    t_done = time.perf_counter()
    answered = outcome.predictor
    content, header_length = v2.render_infer(parsed, outcome.results, answered.name, answered.version)
    if header_length is None:
        response = Response(content, media_type="application/json")
    else:
        headers = {HEADER_LENGTH: str(header_length)}
        response = Response(content, media_type="application/octet-stream", headers=headers)
    pipeline.observe_response(st, t_done)
    return response


@router.get("/v2", summary="Server metadata: name, version, extensions", responses=V2_SERVER_RESPONSES)
async def server_metadata() -> dict[str, Any]:
    return v2.server_metadata(_server_version())


@router.get(
    "/v2/health/live", summary="Server live (200 while the process answers)", responses=V2_LIVE_RESPONSES
)
async def live(request: Request) -> JSONResponse:
    st = get_state(request)
    if st.device_failed:  # the process runs but can never serve again: restart it
        raise ServiceError("device_failed", st.device_failed)
    if st.failed:
        raise ServiceError("warmup_failed", st.failed)
    return JSONResponse({"live": True})


@router.get(
    "/v2/health/ready",
    summary="Server ready: 200 only once warmed up and not draining",
    responses=V2_READY_RESPONSES,
)
async def ready(request: Request) -> JSONResponse:
    err = _unready(get_state(request))
    if err is not None:
        raise err
    return JSONResponse({"ready": True})


@router.get(
    "/v2/models/{name}",
    summary="Model metadata (the checkpoint's name and version)",
    responses=V2_MODEL_RESPONSES,
)
@router.get(
    "/v2/models/{name}/versions/{model_version}",
    summary="Model metadata for one version",
    responses=V2_MODEL_RESPONSES,
)
async def model_metadata(request: Request, name: str, model_version: str | None = None) -> dict[str, Any]:
    p = _model(get_state(request), name, model_version)
    return v2.model_metadata(p.name, p.version, p.input_shape, len(p.labels))


@router.get("/v2/models/{name}/ready", summary="Model ready", responses=V2_MODEL_READY_RESPONSES)
@router.get(
    "/v2/models/{name}/versions/{model_version}/ready",
    summary="Model version ready",
    responses=V2_MODEL_READY_RESPONSES,
)
async def model_ready(request: Request, name: str, model_version: str | None = None) -> JSONResponse:
    st = get_state(request)
    p = _model(st, name, model_version)
    err = _unready(st)
    if err is not None:
        raise err
    return JSONResponse({"name": p.name, "ready": True})
