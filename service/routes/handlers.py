"""Exceptions -> the JSON error shape `{"error": {"code", "message", "index"?, "request_id"}}`, or
`{"error": "message"}` under /v2 (the Open Inference Protocol's shape).

HTTP status codes live here and in the routes only; the rest of the service raises typed errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import ImageError
from service.http_errors import REJECTION_REASONS, ServiceError
from service.middleware import error_body
from service.pipeline import count_rejected
from service.protocols import protocol_of
from service.state import get_state

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _request_id(request: Request) -> str | None:
    rid: str | None = request.scope.get("state", {}).get("request_id")
    return rid


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    index: int | None = None,
) -> JSONResponse:
    if request.url.path.startswith("/v2"):  # the protocol's error object is a bare message
        if index is not None:  # no per-item errors in v2: the request fails, naming the element
            message = f"element {index} of the input: {message}"
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body = error_body(code, message, _request_id(request), index)
    return JSONResponse(body, status_code=status, headers=headers)


def _count(request: Request, reason: str, images: int = 1) -> None:
    protocol = protocol_of(request.url.path)
    if protocol is not None:
        count_rejected(get_state(request).metrics, reason, protocol, images)


async def on_image_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    _count(request, exc.code, exc.images)
    return error_response(request, exc.status, exc.code, exc.message, None, exc.index)


async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.code in REJECTION_REASONS:
        _count(request, exc.code, exc.images)
    return error_response(request, exc.status, exc.code, exc.message, exc.headers)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "header"))
        problems.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    _count(request, "invalid_parameter")
    return error_response(request, 422, "invalid_parameter", "; ".join(problems) or "invalid request")


async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers: dict[str, Any] | None = getattr(exc, "headers", None)
    return error_response(request, exc.status_code, code, str(exc.detail), headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ImageError, on_image_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_exception)
