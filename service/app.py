"""The application factory and its lifespan: load, warm up, serve, drain.

`create_app(settings)` builds the FastAPI app; nothing is read from the environment at import time.
The lifespan loads and verifies the checkpoint on the resolved device before the port opens (a wrong
file or device stops start-up at once), then warms up in the background with the port open:
/healthz answers 200 at once, so a liveness probe never kills a replica that is still warming up (a
compiled model takes minutes), while /readyz and /v1/predict answer 503 `not_ready` until every batch
size has run. A warm-up failure stops the process (non-zero exit). On SIGTERM /readyz turns 503, every
response says `Connection: close`, the listener stays open for the drain delay, then closes (late
clients are refused at connect), and the process waits until no connection holds an unanswered
request (service/http_server.py; bounded by the grace period) before uvicorn shuts down and the
lifespan drains the batcher.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType

import torch
from fastapi import FastAPI
from PIL import Image
from starlette.middleware.cors import CORSMiddleware

from model.checkpoint import CheckpointError
from model.device import resolve_device, set_tf32
from service import OMP_POLICY_APPLIED, routes, runtime_trial
from service.batching import BatcherClosed
from service.decode import decode_to_tensor
from service.errors import ERROR_CODES
from service.explain import Explainer
from service.http_errors import REJECTION_REASONS
from service.http_server import HTTP_LAYER_REASONS, LAYER, HttpLimits
from service.logs import configure_logging
from service.memory import release_memory, trim_when_idle
from service.metrics import Metrics
from service.middleware import InFlight, RequestContextMiddleware
from service.predictor import WarmupStopped
from service.protocols import PROTOCOLS
from service.routes.predict import FastPredict
from service.settings import Settings, load_settings
from service.state import ServiceState, build_predictor, warm_up, warmed_sizes
from service.watch import start_watching, stop_watching

log = logging.getLogger(__name__)
DESCRIPTION = """Image classification for a convserve checkpoint.

`POST /v1/predict` takes one image as the raw body, one or many multipart files, or
`{"images": ["<base64>", ...]}`. Every error is `{"error": {"code", "message", "index"?}}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    configure_logging(settings.log_format, settings.log_level, settings.access_log)
    metrics = Metrics()
    metrics.init_reasons([*ERROR_CODES, *REJECTION_REASONS], PROTOCOLS)
    metrics.init_reasons(HTTP_LAYER_REASONS, ["http"])
    in_flight = InFlight()
    # The HTTP layer (when serving through service.http_server's protocol) enforces these limits
    # before the app sees a request, and counts what it refuses in the same rejection metric.
    LAYER.configure(
        HttpLimits(
            max_request_line_bytes=settings.max_request_line_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_s=settings.header_timeout_s,
        ),
        # protocol="http": refused before any route, so before it is known whether it was v1 or v2
        lambda reason: metrics.rejected.labels(reason, "http").inc(),
    )
    app = FastAPI(
        title="convserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # service/routes/ui.py serves /docs with local assets (FastAPI's loads a CDN)
        redoc_url=None,
        # Our Prometheus metrics are the telemetry; FastAPI's OpenTelemetry hooks read os.environ on
        # every request (2.6% of the service's CPU in the benchmark profile) and export nothing here.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.in_flight = in_flight
    app.state.explainer = Explainer(settings, metrics)
    routes.install(app, settings.ui)
    # Added first = innermost: inside CORS and the request context (id, metrics, last-resort 500s).
    app.add_middleware(FastPredict)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    # Added last = outermost: CORS preflights and 404s get a request id and are counted too.
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        endpoints=routes.ENDPOINTS,
        work=routes.WORK_ENDPOINTS,
        in_flight=in_flight,
    )
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    torch.set_num_threads(settings.batch_threads)
    if not OMP_POLICY_APPLIED:
        log.warning("torch was imported before the service package, so OMP_WAIT_POLICY=PASSIVE is not in "
                    "effect; set it in the environment to avoid OpenMP spin-waiting")
    try:
        device = resolve_device(settings.device)
        predictor = await asyncio.to_thread(build_predictor, settings, device, settings.checkpoint,
                                            first_start=True)
    except (CheckpointError, ValueError) as e:
        log.error("cannot start: %s", e)
        raise
    tf32 = set_tf32(settings.tf32)  # before the first kernel: cuDNN would otherwise use TF32 for "fp32"
    if device.type == "cuda":
        log.info("TF32 for fp32 on %s: %s (--tf32 to change)", device, "on" if settings.tf32 else "off")
        torch.cuda.set_device(device)  # cuda:N is the current device here too (the model code names it)
        metrics.watch_gpus([device])
    log.debug("tf32 flags %s", tf32)
    state = ServiceState(settings, metrics, device, predictor)
    app.state.convserve = state
    app.state.explainer.predicting = state.predicting  # explanations start in the gaps between them
    restore, stop_server = _drain_on_sigterm(state, app.state.in_flight)
    warming = asyncio.create_task(_warm_up_then_ready(state, stop_server), name="warm-up")
    watcher = start_watching(state)  # None unless --watch-checkpoint
    # After a burst, the freed activations go back to the OS once the service is idle (service/memory.py);
    # not during a first start's runtime trial, whose timed passes would pay the page faults
    trimmer = asyncio.create_task(trim_when_idle(
        lambda: state.predicting() or state.predictor.runtime_pending, lambda: state.batches_run,
        _count_returned(metrics), trim_fn=lambda: _release_memory(state)), name="idle-trim")
    try:
        yield
    finally:
        state.start_draining()  # also tells a running warm-up to stop at its next batch size
        trimmer.cancel()
        if state.ready:  # what is left of that task is a first start's runtime trial: not needed now
            warming.cancel()
        await stop_watching(watcher)
        await asyncio.wait([warming])
        await state.close()
        app.state.explainer.close()
        restore()
        log.info("stopped: batcher drained")


def _release_memory(state: ServiceState, collect: bool = False) -> Awaitable[float]:
    """The served runtime's pool (on the inference thread, between batches), then the free heap."""
    return release_memory(lambda: state.batcher.call_in_worker(state.predictor.release_memory), collect)


def _count_returned(metrics: Metrics) -> Callable[[float], None]:
    def returned(mib: float) -> None:
        metrics.memory_trims.inc()
        metrics.memory_returned.inc(mib * 2**20)

    return returned


async def _warm_up_then_ready(state: ServiceState, stop_server: Callable[[], None] | None) -> None:
    """Warm up, start the batcher, report ready. On failure mark the state failed and stop the
    server with `stop_server` (under uvicorn: our SIGTERM path, and the process exits non-zero:
    python -m service checks `failed`, bare uvicorn dies by the re-raised signal). Without it (an
    in-process test client) /healthz says 503 and the embedder decides."""
    settings, predictor = state.settings, state.predictor
    try:
        # On the inference thread itself: per-thread state (oneDNN kernels per thread count,
        # cuDNN/cuBLAS handles, allocator streams) is then ready where the model runs.
        state.set_threads(*await state.batcher.call_in_worker(
            warm_up, predictor, settings.warmup_sizes(), settings.lone_threads, state.stopping,
            settings.warmup == "auto",
        ))
        state.publish_model()  # --precision auto has chosen by now
        await _warm_decode(state)
        # Load, folding and warm-up freed hundreds of MiB that glibc would keep mapped (idle RSS).
        await _release_memory(state, collect=True)
        if state.draining:  # SIGTERM arrived during the decode warm-up
            return
        state.batcher.start()
    except WarmupStopped:
        log.info("warm-up stopped: shutting down before ready")
        return
    except Exception as e:
        state.failed = f"the model failed its warm-up: {e}"
        log.error("cannot serve: %s", state.failed, exc_info=True)
        if stop_server is not None:
            stop_server()
        return
    state.set_ready(True)
    log.info(
        "ready: %s on %s (%s, %s), max batch %d, queue limit %d, %d decode threads, %d torch threads "
        "(%d for a lone request), OMP_WAIT_POLICY=%s",
        predictor.name,
        state.device,
        predictor.runtime.name,
        predictor.precision_choice.reason if settings.precision == "auto" else predictor.precision,
        settings.max_batch_size,
        settings.queue_limit,
        settings.decode_workers,
        state.batch_threads,
        state.lone_threads,
        os.environ.get("OMP_WAIT_POLICY", "unset"),
    )
    if predictor.runtime_pending:  # --runtime auto on a first start (service/runtime_trial.py)
        log.info("runtime %s; building it now, timing it between requests", predictor.runtime_choice.reason)
        try:
            await runtime_trial.run(state, warmed_sizes(predictor, settings.warmup_sizes(),
                                                        settings.warmup == "auto"))
        except Exception:  # an optional speed-up: torch goes on serving
            log.warning("runtime auto: the trial failed; torch serves", exc_info=True)


async def _warm_decode(state: ServiceState) -> None:
    """Start every decode thread and run a JPEG and a PNG through each, so the first requests do
    not pay for thread start-up and first-use initialisation (measured: ~0.3 s on the first request)."""
    pre = state.predictor.preprocess
    sample = Image.new("RGB", (pre.size * 2, pre.size * 2), (128, 64, 32))
    blobs = []
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        sample.save(buf, fmt)
        blobs.append(buf.getvalue())
    loop = asyncio.get_running_loop()
    limit = state.settings.max_image_pixels
    jobs = [
        loop.run_in_executor(state.decode_pool, decode_to_tensor, blob, pre, limit, None)
        for _ in range(state.settings.decode_workers)
        for blob in blobs
    ]
    await asyncio.gather(*jobs)


def _drain_on_sigterm(
    state: ServiceState, in_flight: InFlight
) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """Wrap the server's SIGTERM handler: first mark not-ready and let in-flight work finish with the
    listener still open (a load balancer may still route to us for a moment), then hand over.

    Returns (restore the previous handler, stop this server through that path); the second is None
    when nothing was wrapped (not under uvicorn's signal handling, e.g. an in-process test client),
    so that the service never signals a process it does not own."""
    if threading.current_thread() is not threading.main_thread():
        return (lambda: None), None
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):  # not under uvicorn (an in-process test client): nothing to wrap
        return (lambda: None), None
    loop = asyncio.get_running_loop()
    settings = state.settings
    tasks: set[asyncio.Task[None]] = set()
    fired = False

    async def drain(sig: int, frame: FrameType | None) -> None:
        state.start_draining()
        log.info("SIGTERM: /readyz now 503; finishing %d in-flight request(s)", in_flight.count)

        def app_busy() -> bool:
            return bool(in_flight.count or state.batcher.depth or state.batcher.busy)

        if LAYER.active:  # our protocol: Connection: close, unread requests counted, listener closed
            settled = await LAYER.drain(settings.drain_delay_s, settings.grace_period_s, app_busy)
        else:  # another HTTP protocol: only the requests the app has started are visible
            await asyncio.sleep(settings.drain_delay_s)
            deadline = loop.time() + settings.grace_period_s
            while app_busy() and loop.time() < deadline:
                await asyncio.sleep(0.02)
            settled = not app_busy()
        if not settled:
            # Answer what is left now (503 shutting_down, Retry-After: another replica takes it);
            # left to uvicorn's shutdown, those requests would be cancelled and answered 500.
            left = state.batcher.abandon(BatcherClosed("the grace period ran out"))
            log.warning("grace period (%.1fs) over with work left: stopping anyway (%d queued or running "
                        "image(s) answered 503 shutting_down)", settings.grace_period_s, left)
        previous(sig, frame)  # uvicorn: stop accepting, close idle connections, run lifespan shutdown

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:  # a second SIGTERM: stop waiting
            previous(sig, frame)
            return
        fired = True

        def start() -> None:
            task = loop.create_task(drain(sig, frame))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.call_soon_threadsafe(start)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    def stop_server() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)

    return restore, stop_server
