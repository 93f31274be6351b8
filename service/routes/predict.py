"""POST /v1/predict: body -> images -> decode (thread pool) -> batcher -> JSON.

Hot path, so: the body is read straight from the ASGI stream, the response is a dict serialised once
(no pydantic response model), and nothing is logged per request at INFO.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Query
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from model.preprocess import Preprocess
from service.batching import BatcherClosed, DeadlineExceeded, Overloaded
from service.decode import decode_to_tensor
from service.errors import ImageError
from service.http_errors import ServiceError
from service.inputs import Upload, check_declared_length, parse_body, read_limited
from service.middleware import error_body
from service.predictor import Job, JobResult
from service.routes.openapi import PREDICT_BODY, PREDICT_RESPONSES
from service.state import ServiceState, get_state

log = logging.getLogger(__name__)
router = APIRouter(tags=["predict"])
Decoded = tuple[torch.Tensor | ImageError, float]
RETRY = {"Retry-After": "1"}  # a batch takes milliseconds to seconds: retry soon, with backoff


def _decode_timed(data: bytes, preprocess: Preprocess, max_pixels: int, content_type: str | None) -> Decoded:
    start = time.perf_counter()
    try:
        out: torch.Tensor | ImageError = decode_to_tensor(data, preprocess, max_pixels, content_type)
    except ImageError as e:
        out = e
    return out, time.perf_counter() - start


async def _cancel_on_disconnect(
    receive: Callable[[], Awaitable[Any]], futures: list[asyncio.Future[Any]]
) -> None:
    """The body is read, so the next ASGI message is the client going away: drop its queued work."""
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                for f in futures:
                    f.cancel()
                return
    except Exception:  # the server's receive failing means the connection is gone as well
        for f in futures:
            f.cancel()


def _json(obj: dict[str, Any], status: int = 200) -> Response:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json")


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
    check_declared_length(request.headers.get("content-length"), s.max_upload_bytes)
    try:
        body = await read_limited(request.stream(), s.max_upload_bytes)
    except ClientDisconnect:
        st.metrics.rejected.labels("client_disconnected").inc()
        return Response(status_code=499)  # nobody is listening; recorded in the request metrics only
    content_type = request.headers.get("content-type")
    parsed = parse_body(body, content_type, s.max_images_per_request)
    if st.device_failed:  # a sticky device error: nothing will run here again
        message = f"the device failed ({st.device_failed}); this replica is being replaced"
        raise ServiceError("device_failed", message, headers=RETRY, images=len(parsed.entries))
    if not st.ready:  # warming up (the port opens first): answer now rather than queue behind it
        message = "the model is still warming up; retry shortly"
        raise ServiceError("not_ready", message, headers=RETRY, images=len(parsed.entries))
    read_s = time.perf_counter() - start

    predictor = st.predictor  # one model for the whole request, even if a reload lands meanwhile
    k = min(top_k or s.default_top_k, len(predictor.labels))
    m = st.metrics
    # Per-image errors of a multi-image request are counted as soon as they are known: the rest of
    # the request may still fail as a whole (overloaded, timeout). A single image's error is raised
    # below and counted by the error handler.
    count_items = not parsed.single
    for e in parsed.entries:
        if isinstance(e, ImageError) and count_items:
            m.rejected.labels(e.code).inc()
    uploads = [e for e in parsed.entries if isinstance(e, Upload)]
    decoded = iter(await _decode_all(st, uploads, predictor.preprocess, start + s.request_timeout_s))
    t_decoded = time.perf_counter()

    outcomes: list[torch.Tensor | ImageError] = []
    decode_stage = m.stage["decode"]
    for index, entry in enumerate(parsed.entries):
        if isinstance(entry, ImageError):
            outcomes.append(entry)
            continue
        out, seconds = next(decoded)
        decode_stage.observe(seconds)
        if isinstance(out, ImageError) and count_items:
            m.rejected.labels(out.code).inc()
        outcomes.append(out if isinstance(out, torch.Tensor) else out.with_index(index))
    if parsed.single and isinstance(outcomes[0], ImageError):
        err = outcomes[0]
        raise ImageError(err.code, err.message, err.status)  # the handler counts it

    jobs = [Job(o, k, probabilities == "all", predictor) for o in outcomes if isinstance(o, torch.Tensor)]
    results = await _run_jobs(request, st, jobs, start + s.request_timeout_s) if jobs else []
    t_done = time.perf_counter()

    for r in results:
        m.stage["queue"].observe(r.queue_s)
        m.predictions.labels(r.top1_label).inc()
        m.top1_confidence.observe(r.top1_probability)
    timing = {
        "read": round(read_s * 1000, 3),
        "decode": round((t_decoded - start - read_s) * 1000, 3),
        "queue": round(max((r.queue_s for r in results), default=0.0) * 1000, 3),
        "inference": round(max((r.inference_s for r in results), default=0.0) * 1000, 3),
        "total": round((t_done - start) * 1000, 3),
    }
    rendered = iter(results)
    items: list[dict[str, Any]] = []
    for index, o in enumerate(outcomes):
        if isinstance(o, ImageError):
            items.append({"index": index, **error_body(o.code, o.message, None, index)})
            continue
        r = next(rendered)
        item: dict[str, Any] = {"index": index, "predictions": r.predictions}
        if r.probabilities is not None:
            item["probabilities"] = r.probabilities
        items.append(item)
    answer: dict[str, Any] = {"model": results[0].model if results else predictor.ref}
    if parsed.single:
        answer.update((key, v) for key, v in items[0].items() if key != "index")
    else:
        answer["results"] = items
    answer["timing_ms"] = timing
    response = _json(answer)
    m.stage["response"].observe(time.perf_counter() - t_done)
    return response


async def _decode_all(
    st: ServiceState, uploads: list[Upload], pre: Preprocess, deadline: float
) -> list[Decoded]:
    """Decode every upload in the pool, in parallel, within the request's deadline.

    Admission covers decoding as well as the batch queue: images being decoded count against
    --queue-limit, so an overload is refused at once (503) instead of piling request bodies up in
    the decode pool until every client times out."""
    s = st.settings
    busy = st.decoding + st.batcher.depth
    if busy + len(uploads) > s.queue_limit:
        raise ServiceError(
            "overloaded",
            f"the server is busy: {busy} image(s) decoding or queued, limit {s.queue_limit}; retry shortly",
            headers=RETRY,
            images=len(uploads),
        )
    loop = asyncio.get_running_loop()
    max_px = s.max_image_pixels
    pool = st.decode_pool
    tasks = [loop.run_in_executor(pool, _decode_timed, u.data, pre, max_px, u.content_type) for u in uploads]
    st.decoding += len(uploads)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
            return await asyncio.gather(*tasks)
    except TimeoutError:
        for t in tasks:  # decodes that have not started yet never will
            t.cancel()
        message = f"no answer within {s.request_timeout_s:g}s (spent decoding)"
        raise ServiceError("timeout", message, images=len(uploads)) from None
    finally:
        st.decoding -= len(uploads)


async def _run_jobs(request: Request, st: ServiceState, jobs: list[Job], deadline: float) -> list[JobResult]:
    timeout = st.settings.request_timeout_s
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise ServiceError("timeout", f"no answer within {timeout:g}s (spent decoding)", images=len(jobs))
    try:
        futures = st.batcher.submit_many_nowait(jobs, remaining)
    except Overloaded as e:
        raise ServiceError(
            "overloaded", f"the server is busy: {e}; retry shortly", headers=RETRY, images=len(jobs)
        ) from None
    except BatcherClosed:
        raise ServiceError(
            "shutting_down", "the server is shutting down", headers=RETRY, images=len(jobs)
        ) from None
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, list(futures)))
    try:
        async with asyncio.timeout(remaining):
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
    except TimeoutError:
        raise ServiceError("timeout", f"no answer within {timeout:g}s", images=len(jobs)) from None
    finally:
        watcher.cancel()
    results: list[JobResult] = []
    for o in outcomes:
        if isinstance(o, JobResult):
            results.append(o)
        elif isinstance(o, asyncio.CancelledError):  # the watcher saw the client go
            raise ServiceError("client_disconnected", "the client went away", 499, images=len(jobs))
        elif isinstance(o, DeadlineExceeded):
            raise ServiceError("timeout", f"no answer within {timeout:g}s", images=len(jobs)) from None
        elif isinstance(o, BatcherClosed):
            raise ServiceError(
                "shutting_down", "the server is shutting down", headers=RETRY, images=len(jobs)
            )
        else:
            rid = request.scope.get("state", {}).get("request_id")
            log.error("request %s failed: %r (the log above has the details)", rid, o)
            if st.device_failed:  # this batch was the one that found the device gone
                raise ServiceError("device_failed", f"the device failed ({st.device_failed}); retry on "
                                   "another replica", headers=RETRY, images=len(jobs))
            raise ServiceError(
                "internal_error",
                f"the model failed on this request's batch ({type(o).__name__}); the server log has "
                "the traceback next to this request id",
                images=len(jobs),
            )
    return results
