"""One inference path for every protocol: admission -> decode in the pool -> batcher -> predictor.

A protocol (service/protocols/) parses its request into `Entry`s (an upload to decode, an already
preprocessed tensor, or the entry's own `ImageError`) and renders the `Outcome`; everything else a
client relies on lives here once: the not-ready and admission 503s before any decoding, the
request's deadline (504), one model per request across a reload, dropping queued work when the
client disconnects, and the metrics (stage timings, rejections per image, predictions).

Nothing here knows HTTP beyond the ASGI `receive` callable used to notice a disconnect; failures are
`ServiceError`/`ImageError`, which the edge turns into status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.preprocess import Preprocess
from service.batching import BatcherClosed, DeadlineExceeded, DynamicBatcher, Overloaded
from service.decode import DecodeElsewhere, decode_to_tensor
from service.errors import ImageError
from service.http_errors import ServiceError
from service.inputs import Upload
from service.metrics import Metrics
from service.predictor import Job, JobResult, Predictor
from service.settings import Settings

log = logging.getLogger(__name__)
RETRY = {"Retry-After": "1"}  # a batch takes milliseconds to seconds: retry soon, with backoff
Entry = Upload | torch.Tensor | ImageError  # torch.Tensor: (C, H, W) float32, already normalised
Decoded = tuple[torch.Tensor | ImageError, float]
Receive = Callable[[], Awaitable[Any]]
# A lone small upload decodes on the event loop when no other decode is running: two thread hops
# cost more than the decode itself there (Zen 3, one client, convnet: pool hand-off and return 0.24
# ms, a 64x64 JPEG's decode 0.5 ms). Bounded by the bytes and by the header's pixel count (a few KiB
# of PNG can hold megapixels), so the loop is held ~1-2 ms at most; larger images go to the pool.
INLINE_BYTES = 64 * 1024
INLINE_PIXELS = 512 * 512


class Host(Protocol):
    """What the pipeline needs from the running service (service.state.ServiceState has it all)."""

    settings: Settings
    metrics: Metrics
    batcher: DynamicBatcher[Job, JobResult]
    decode_pool: ThreadPoolExecutor
    predictor: Predictor
    ready: bool
    device_failed: str | None  # a sticky device error: nothing will run here again
    decoding: int


@dataclass(slots=True)
class Outcome:
    """One result per entry, in input order: a JobResult or that entry's ImageError (with its index)."""

    items: list[JobResult | ImageError]
    model: dict[str, str]  # the model that answered
    predictor: Predictor  # the one model this request used (labels, shapes for rendering)
    timing_ms: dict[str, float]

    @property
    def results(self) -> list[JobResult]:
        return [r for r in self.items if isinstance(r, JobResult)]


def _decode_timed(
    data: bytes, pre: Preprocess, max_pixels: int, content_type: str | None, defer_above: int | None = None
) -> Decoded:
    """Raises DecodeElsewhere (from the header, before any pixel) above `defer_above` pixels."""
    start = time.perf_counter()
    try:
        out: torch.Tensor | ImageError = decode_to_tensor(data, pre, max_pixels, content_type, defer_above)
    except ImageError as e:
        out = e
    return out, time.perf_counter() - start


async def _cancel_on_disconnect(receive: Receive, futures: list[asyncio.Future[Any]]) -> None:
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


def count_rejected(metrics: Metrics, reason: str, protocol: str, images: int = 1) -> None:
    """The one place rejections are counted (the error handlers call it for whole-request errors)."""
    metrics.rejected.labels(reason, protocol).inc(images)


async def infer(
    host: Host,
    entries: Sequence[Entry],
    *,
    protocol: str,
    receive: Receive,
    start: float,
    top_k: int,
    all_probs: bool,
    all_or_nothing: bool,
    request_id: str | None = None,
) -> Outcome:
    """Run a request's entries through the model.

    `all_or_nothing` (a single /v1 image, every /v2 request): the first bad entry fails the whole
    request as an ImageError (index set when there are several entries), before anything is queued;
    the handler counts it, the pipeline counts any further bad entries. Otherwise each bad entry is
    counted here and returned in its place while its neighbours are answered.
    `start` is when the request began (perf_counter): the deadline runs from there.
    """
    s, m = host.settings, host.metrics
    if host.device_failed:
        message = f"the device failed ({host.device_failed}); this replica is being replaced"
        raise ServiceError("device_failed", message, headers=RETRY, images=len(entries))
    if not host.ready:  # warming up (the port opens first): answer now rather than queue behind it
        message = "the model is still warming up; retry shortly"
        raise ServiceError("not_ready", message, headers=RETRY, images=len(entries))
    predictor = host.predictor  # one model for the whole request, even if a reload lands meanwhile
    deadline = start + s.request_timeout_s
    t_read = time.perf_counter()
    many = len(entries) > 1
    # Entries the parser already refused are known before any work: fail or count them first, so
    # they are counted by their own reason even if the rest of the request then fails as a whole.
    _settle([e for e in entries if isinstance(e, ImageError)], m, protocol, all_or_nothing, many)
    uploads = [e for e in entries if isinstance(e, Upload)]
    _admit(host, sum(not isinstance(e, ImageError) for e in entries))
    decoded = iter(await _decode_all(host, uploads, predictor.preprocess, deadline))
    t_decoded = time.perf_counter()

    outcomes: list[torch.Tensor | ImageError] = []
    decode_stage = m.stage["decode"]
    bad: list[ImageError] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, Upload):
            out, seconds = next(decoded)
            decode_stage.observe(seconds)
            if isinstance(out, ImageError):
                out = out.with_index(index) if many else out
                bad.append(out)
            entry = out
        elif isinstance(entry, ImageError) and many:
            entry = entry.with_index(index)
        outcomes.append(entry)
    _settle(bad, m, protocol, all_or_nothing, many)

    k = min(top_k, len(predictor.labels))
    jobs = [Job(o, k, all_probs, predictor) for o in outcomes if isinstance(o, torch.Tensor)]
    results = iter(await _run_jobs(host, jobs, deadline, receive, request_id) if jobs else [])
    t_done = time.perf_counter()
    items: list[JobResult | ImageError] = [
        o if isinstance(o, ImageError) else next(results) for o in outcomes
    ]
    done = [r for r in items if isinstance(r, JobResult)]
    for r in done:
        m.stage["queue"].observe(r.queue_s)
        m.predictions.labels(r.top1_label).inc()
        m.top1_confidence.observe(r.top1_probability)
    timing = {
        "read": round((t_read - start) * 1000, 3),
        "decode": round((t_decoded - t_read) * 1000, 3),
        "queue": round(max((r.queue_s for r in done), default=0.0) * 1000, 3),
        "inference": round(max((r.inference_s for r in done), default=0.0) * 1000, 3),
        "total": round((t_done - start) * 1000, 3),
    }
    model = done[0].model if done else predictor.ref
    return Outcome(items, model, predictor, timing)


def _settle(errors: list[ImageError], m: Metrics, protocol: str, all_or_nothing: bool, many: bool) -> None:
    """Count bad entries; in all-or-nothing mode raise the first (the error handler counts that one)."""
    if not errors:
        return
    rest = errors[1:] if all_or_nothing else errors
    for e in rest:
        count_rejected(m, e.code, protocol)
    if all_or_nothing:
        first = errors[0]
        raise first if many else ImageError(first.code, first.message, first.status)


def observe_response(host: Host, since: float) -> None:
    """Rendering time, observed by the protocol once its answer is serialised."""
    host.metrics.stage["response"].observe(time.perf_counter() - since)


def _admit(host: Host, n: int) -> None:
    """Admission covers decoding as well as the batch queue: images being decoded count against
    --queue-limit, so an overload is refused at once (503) instead of piling request bodies up in
    the decode pool until every client times out."""
    limit = host.settings.queue_limit
    busy = host.decoding + host.batcher.depth
    if busy + n > limit:
        raise ServiceError(
            "overloaded",
            f"the server is busy: {busy} image(s) decoding or queued, limit {limit}; retry shortly",
            headers=RETRY,
            images=n,
        )


async def _decode_all(host: Host, uploads: list[Upload], pre: Preprocess, deadline: float) -> list[Decoded]:
    """Decode every upload in the pool, in parallel, within the request's deadline (a lone small
    one on the event loop, see INLINE_BYTES)."""
    if not uploads:
        return []
    s = host.settings
    max_px = s.max_image_pixels
    if len(uploads) == 1 and host.decoding == 0 and len(uploads[0].data) <= INLINE_BYTES:
        u = uploads[0]
        try:
            return [_decode_timed(u.data, pre, max_px, u.content_type, INLINE_PIXELS)]
        except DecodeElsewhere:
            pass
    loop = asyncio.get_running_loop()
    pool = host.decode_pool
    tasks = [loop.run_in_executor(pool, _decode_timed, u.data, pre, max_px, u.content_type) for u in uploads]
    host.decoding += len(uploads)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
            return await asyncio.gather(*tasks)
    except TimeoutError:
        for t in tasks:  # decodes that have not started yet never will
            t.cancel()
        message = f"no answer within {s.request_timeout_s:g}s (spent decoding)"
        raise ServiceError("timeout", message, images=len(uploads)) from None
    finally:
        host.decoding -= len(uploads)
        host.batcher.notify()  # a batch waiting for these re-checks (a failed one is never submitted)


async def _run_jobs(
    host: Host, jobs: list[Job], deadline: float, receive: Receive, request_id: str | None
) -> list[JobResult]:
    timeout = host.settings.request_timeout_s
    remaining = deadline - time.perf_counter()
    n = len(jobs)
    if remaining <= 0:
        raise ServiceError("timeout", f"no answer within {timeout:g}s (spent decoding)", images=n)
    try:
        futures = host.batcher.submit_many_nowait(jobs, remaining)
    except Overloaded as e:
        message = f"the server is busy: {e}; retry shortly"
        raise ServiceError("overloaded", message, headers=RETRY, images=n) from None
    except BatcherClosed:
        raise ServiceError("shutting_down", "the server is shutting down", headers=RETRY, images=n) from None
    watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, list(futures)))
    try:
        async with asyncio.timeout(remaining):
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
    except TimeoutError:
        raise ServiceError("timeout", f"no answer within {timeout:g}s", images=n) from None
    finally:
        watcher.cancel()
    results: list[JobResult] = []
    for o in outcomes:
        if isinstance(o, JobResult):
            results.append(o)
        elif isinstance(o, asyncio.CancelledError):  # the watcher saw the client go
            raise ServiceError("client_disconnected", "the client went away", 499, images=n)
        elif isinstance(o, DeadlineExceeded):
            raise ServiceError("timeout", f"no answer within {timeout:g}s", images=n) from None
        elif isinstance(o, BatcherClosed):
            raise ServiceError("shutting_down", "the server is shutting down", headers=RETRY, images=n)
        else:
            log.error("request %s failed: %r (the log above has the details)", request_id, o)
            if host.device_failed:  # this batch was the one that found the device gone
                raise ServiceError("device_failed", f"the device failed ({host.device_failed}); retry on "
                                   "another replica", headers=RETRY, images=n)
            raise ServiceError(
                "internal_error",
                f"the model failed on this request's batch ({type(o).__name__}); the server log has "
                "the traceback next to this request id",
                images=n,
            )
    return results
