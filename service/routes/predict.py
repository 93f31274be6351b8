"""POST /v1/predict: parse the body (raw, multipart or JSON base64), run the pipeline, render JSON.

Hot path, so: the body is read straight from the ASGI stream, the response is a dict serialised once
(no pydantic response model), and nothing is logged per request at INFO.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import Response

from service import pipeline
from service.inputs import parse_body, read_body
from service.protocols import v1
from service.routes.openapi import PREDICT_BODY, PREDICT_RESPONSES
from service.state import get_state

router = APIRouter(tags=["predict"])


@router.post(
    "/v1/predict",
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
            le=1000,
            description="predictions per image (default from settings; clamped to the class count)",
        ),
    ] = None,
    probabilities: Annotated[
        Literal["all"] | None, Query(description="`all` adds the whole softmax vector, in class-index order")
    ] = None,
) -> Response:
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
