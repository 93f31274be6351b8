"""POST /v1/predict: parse the body (raw, multipart or JSON base64), run the pipeline, render JSON.

Hot path, so: the body is read straight from the ASGI stream, the response is a dict serialised once
(no pydantic response model), and nothing is logged per request at INFO. `FastPredict` answers the
usual request (POST, a query of plain `top_k` / `probabilities`) straight from ASGI, ahead of
FastAPI's routing, dependency solving and exception middleware: those cost the event loop 0.3-0.4 ms
per request on AMD EPYC Zen 3, a tenth of a small model's whole answer. Anything else (another
method, a query FastAPI must parse or validate) goes on to the FastAPI route below, which also keeps
the endpoint in the OpenAPI schema; both run `answer`, and errors go through the same handlers.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import pipeline
from service.errors import ImageError
from service.http_errors import ServiceError
from service.inputs import parse_body, read_body
from service.protocols import v1
from service.routes import handlers
from service.routes.openapi import PREDICT_BODY, PREDICT_RESPONSES
from service.state import get_state

router = APIRouter(tags=["predict"])
PATH = "/v1/predict"
TOP_K_MAX = 1000
Probabilities = Literal["all"] | None


async def answer(request: Request, top_k: int | None, probabilities: Probabilities) -> Response:
    """The endpoint itself, for both ways in; raises ImageError / ServiceError for the handlers."""
    st = get_state(request)
    s = st.settings
    start = time.perf_counter()
    body = await read_body(request, s.max_upload_bytes)
    parsed = parse_body(body, request.headers.get("content-type"), s.max_images_per_request)
    outcome = await pipeline.infer(
        st,
        parsed.entries,
        protocol="v1",
        receive=request.receive,
        start=start,
        top_k=top_k or s.default_top_k,
        all_probs=probabilities == "all",
        all_or_nothing=parsed.single,
        request_id=request.scope.get("state", {}).get("request_id"),
    )
    t_done = time.perf_counter()
    response = Response(v1.render(outcome, parsed.single), media_type="application/json")
    pipeline.observe_response(st, t_done)
    return response


@router.post(
    PATH,
    summary="Classify one or many images",
    openapi_extra=PREDICT_BODY,
    responses=PREDICT_RESPONSES,
    response_class=Response,
)
async def predict(
    request: Request,
    top_k: Annotated[
        int | None,
        Query(
            ge=1,
            le=TOP_K_MAX,
            description="predictions per image (default from settings; clamped to the class count)",
        ),
    ] = None,
    probabilities: Annotated[
        Probabilities, Query(description="`all` adds the whole softmax vector, in class-index order")
    ] = None,
) -> Response:
    return await answer(request, top_k, probabilities)


def plain_query(raw: bytes) -> tuple[int | None, Probabilities] | None:
    """(top_k, probabilities) from a query string that needs no parsing beyond splitting it: each
    name at most once, `top_k` ASCII digits within 1..TOP_K_MAX, `probabilities=all`, nothing else
    (no other name, no percent-escape). None otherwise: FastAPI parses it, and answers 422 with its
    own message where it is invalid, so both ways in give one behaviour."""
    top_k: int | None = None
    probabilities: Probabilities = None
    if not raw:
        return top_k, probabilities
    seen: set[bytes] = set()
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name in seen:
            return None
        seen.add(name)
        if name == b"top_k" and value.isdigit() and len(value) <= 4 and 1 <= int(value) <= TOP_K_MAX:
            top_k = int(value)
        elif name == b"probabilities" and value == b"all":
            probabilities = "all"
        else:
            return None
    return top_k, probabilities


class FastPredict:
    """ASGI middleware (innermost): POST /v1/predict with a plain query, answered here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and get_route_path(scope) == PATH:
            query = plain_query(scope["query_string"])
            if query is not None:
                request = Request(scope, receive)
                try:
                    response = await answer(request, *query)
                except ImageError as e:
                    response = await handlers.on_image_error(request, e)
                except ServiceError as e:
                    response = await handlers.on_service_error(request, e)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
