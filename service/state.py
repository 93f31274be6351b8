"""What one running service holds: settings, metrics, the current predictor, batcher and decode pool.

The batcher's batch function reads `self.predictor` for every batch, so a reload is one reference
assignment: batches already running finish on the old model, the next batch uses the new one.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from starlette.requests import Request

from model.checkpoint import CheckpointError
from service.batching import DynamicBatcher
from service.metrics import Metrics
from service.predictor import Job, JobResult, Predictor
from service.settings import Settings

log = logging.getLogger(__name__)


def build_predictor(settings: Settings, device: torch.device, path: Path, warm: bool = True) -> Predictor:
    """Load and validate a checkpoint, and warm it up unless the caller does that elsewhere.
    Runs off the event loop; a model being served is untouched."""
    predictor = Predictor.load(
        path,
        device,
        precision=settings.precision,
        channels_last=settings.channels_last,
        compile=settings.compile,
        max_batch_size=settings.max_batch_size,
        fold_bn=settings.fold_batchnorm,
    )
    log.info(
        "loaded %s (%s, %d classes, sha256 %s) from %s on %s/%s",
        predictor.name,
        predictor.meta.arch,
        len(predictor.labels),
        predictor.sha256[:12],
        path,
        device,
        predictor.precision,
    )
    if warm:
        warm_up(predictor, settings.warmup_sizes(), settings.lone_threads)
    return predictor


def warm_up(predictor: Predictor, sizes: list[int], lone_threads: int) -> int:
    """Warm every batch size with the batch thread count, and a lone image with `lone_threads` too
    (oneDNN builds its kernels per thread count). Run it on the thread that will run the model.

    Returns the thread count a lone image should use. More threads are not always faster for one
    image (a small model's parallel regions cost more than they save: the benchmark measured the
    default convnet 1.9x slower on 2 threads than on 1), so the two counts are timed here and all
    cores are used only when they are clearly faster for this model on this machine."""
    took = predictor.warmup(sizes)
    batch_threads = torch.get_num_threads()
    chosen = batch_threads
    if lone_threads != batch_threads:
        torch.set_num_threads(lone_threads)
        try:
            took += predictor.warmup([1])
            wide = _time_single(predictor)
        finally:
            torch.set_num_threads(batch_threads)
        narrow = _time_single(predictor)
        chosen = lone_threads if wide < 0.9 * narrow else batch_threads
        log.info(
            "a lone image takes %.2f ms on %d thread(s), %.2f ms on %d: using %d",
            wide * 1e3, lone_threads, narrow * 1e3, batch_threads, chosen,
        )
    log.info("warm-up of %d batch size(s) (%d..%d) took %.2fs", len(sizes), min(sizes), max(sizes), took)
    return chosen


def _time_single(predictor: Predictor, repeats: int = 5) -> float:
    """Median seconds for one blank image through the model (already warmed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.warmup([1])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class ServiceState:
    def __init__(
        self, settings: Settings, metrics: Metrics, device: torch.device, predictor: Predictor
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = device
        self.predictor = predictor
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self.batcher: DynamicBatcher[Job, JobResult] = DynamicBatcher(
            self.run_batch,
            max_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000.0,
            limit=settings.queue_limit,
            name="inference",
        )
        self.reload_lock = asyncio.Lock()
        # A lone image (batch of one, nothing queued) may use every core: the decode threads are idle
        # then, and one client's latency should not pay for the cores kept free for decoding.
        self.batch_threads = settings.batch_threads
        self.lone_threads = settings.lone_threads
        self.ready = False
        self.draining = False
        metrics.watch_queue(lambda: self.batcher.depth, settings.queue_limit)
        self._publish_model()

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready and not self.draining else 0)

    def start_draining(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    # ---- inference thread ---------------------------------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list[JobResult]:
        """Batch function (inference thread). Jobs decoded for a model whose preprocessing differs
        from the current one (a reload changed the input size) finish on the model they were made for."""
        current = self.predictor
        groups: dict[int, tuple[Predictor, list[int]]] = {}
        for i, job in enumerate(jobs):
            p = (
                current
                if job.predictor is current or job.predictor.preprocess == current.preprocess
                else job.predictor
            )
            groups.setdefault(id(p), (p, []))[1].append(i)
        results: list[JobResult | None] = [None] * len(jobs)
        lone = len(jobs) == 1 and self.batcher.depth == 0
        threads = self.lone_threads if lone else self.batch_threads
        if threads != torch.get_num_threads():  # per-thread OpenMP setting: cheap, no pool rebuild
            torch.set_num_threads(threads)
        start = time.perf_counter()
        for predictor, rows in groups.values():
            try:
                out = predictor.run([jobs[i] for i in rows])
            except Exception:
                log.exception("inference failed for a batch of %d image(s) on %s", len(rows), predictor.name)
                raise
            for i, r in zip(rows, out, strict=True):
                results[i] = r
        m = self.metrics
        m.stage["inference"].observe(time.perf_counter() - start)
        m.batch_size.observe(len(jobs))
        return [r for r in results if r is not None]

    # ---- reload ------------------------------------------------------------------------------------------
    async def reload(self, path: Path) -> tuple[Predictor, Predictor]:
        """Swap in a new model; raises CheckpointError and keeps the old one when it does not load."""
        async with self.reload_lock:
            try:
                new = await asyncio.to_thread(build_predictor, self.settings, self.device, path)
            except CheckpointError:
                raise
            except Exception as e:  # warm-up failed: the file loaded but the model cannot run
                log.warning("reload of %s failed", path, exc_info=True)
                raise CheckpointError(f"{path}: the model failed its warm-up: {e}") from None
            old, self.predictor = self.predictor, new
            self._publish_model()
            return old, new

    def _publish_model(self) -> None:
        p = self.predictor
        self.metrics.set_model(p.name, p.version, p.meta.arch, str(p.device), p.precision, p.labels)

    async def close(self) -> None:
        await self.batcher.stop(timeout=self.settings.grace_period_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.convserve
    return state
