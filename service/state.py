"""What one running service holds: settings, metrics, the current predictor, batcher and decode pool.

The batcher's batch function reads `self.predictor` for every batch, so a reload is one reference
assignment: batches already running finish on the old model, the next batch uses the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from starlette.requests import Request

from model.checkpoint import CheckpointError
from service import threads
from service.batching import DynamicBatcher
from service.device_health import device_failure
from service.metrics import Metrics
from service.predictor import Job, JobResult, NonFiniteOutput, PrecisionError, Predictor
from service.settings import Settings
from service.thread_tuner import ThreadTuner

log = logging.getLogger(__name__)
# On CUDA the host side of a batch only stacks uint8 images and launches kernels: one torch thread
# is enough, and every other core is left to decoding (timing thread counts there means nothing).
CUDA_TORCH_THREADS = 1


def side_stream(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A CUDA stream of its own for work beside live traffic (a reload's warm-up): kernels on it
    never queue behind, or in front of, the serving stream's batches. A no-op on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


def build_predictor(
    settings: Settings, device: torch.device, path: Path, warm_threads: tuple[int, ...] = (),
    tuner_threads: tuple[int, ...] = (), first_start: bool = False,
) -> Predictor:
    """Load and validate a checkpoint, and warm it up at the given torch thread counts (a reload
    passes the counts in use, and the two the thread tuner alternates; start-up warms on the
    inference thread instead, see warm_up). Runs off the event loop; a model being served is
    untouched. `first_start`: a --runtime auto candidate is built and timed after ready
    (service/runtime_trial.py); a reload builds and times it before it swaps."""
    predictor = Predictor.load(
        path,
        device,
        runtime=settings.runtime,
        export_cache_dir=settings.export_cache_dir,
        precision=settings.precision,
        channels_last=settings.channels_last,
        compile=settings.compile,
        max_batch_size=settings.max_batch_size,
        fold_bn=settings.fold_batchnorm,
        calibration=settings.calibration,
        # what a --runtime auto decision depended on beyond the checkpoint and the machine
        choice_context={"torch_threads": settings.torch_threads, "warmup": settings.warmup},
        defer_candidate=first_start,
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
    if warm_threads:
        # A reload warms beside live traffic: on CUDA on its own stream, which Predictor.run_blank
        # synchronises (not the whole device), so live batches never wait for the warm-up.
        with side_stream(device):
            took = warm_reloaded(predictor, settings.warmup_sizes(), warm_threads, tuner_threads)
        log.info("warm-up at %s thread(s) took %.2fs", "/".join(map(str, warm_threads)), took)
    return predictor


def warm_at(
    predictor: Predictor, sizes: list[int], threads: tuple[int, ...], stop: threading.Event | None = None
) -> float:
    """Run every batch size at each thread count (oneDNN builds its kernels per count); seconds."""
    before = torch.get_num_threads()
    took = 0.0
    try:
        for n in dict.fromkeys(threads):
            torch.set_num_threads(n)
            took += predictor.warmup(sizes, stop)
    finally:
        torch.set_num_threads(before)
    return took


def warm_reloaded(predictor: Predictor, sizes: list[int], threads_in_use: tuple[int, ...],
                  tuner_threads: tuple[int, ...] = ()) -> float:
    """A reload's warm-up at the (batch, lone) counts in use; --precision auto and --runtime auto
    decide first, timed beside live traffic (so a busy service leans to whichever the noise
    favours: the runtime decision of a reload is therefore not kept for later starts)."""
    start = time.perf_counter()
    batch, lone = threads_in_use[0], threads_in_use[-1]
    if getattr(predictor, "candidate", None) is not None:
        threads.settle_precision(predictor, sizes, batch, lone)
    if getattr(predictor, "runtime_candidate", None) is not None:
        threads.settle_runtime(predictor, sizes, batch, lone, every_count=(*threads_in_use, *tuner_threads),
                               served_warm=False, keep=False)
    return warm_at(predictor, sizes, threads_in_use) + (time.perf_counter() - start)


def warmed_sizes(predictor: Predictor, sizes: list[int], auto: bool) -> list[int]:
    """The batch sizes start-up's warm-up runs: all of them, or (`auto`, --warmup auto) on the eager
    CPU only those the thread timing runs, a lone image and the probe batch."""
    return sorted({1, threads.probe_size(sizes)}) if auto and predictor.eager_cpu else sizes


def warm_up(
    predictor: Predictor, sizes: list[int], all_threads: int, stop: threading.Event | None = None,
    auto: bool = False,
) -> tuple[int, int]:
    """Warm every batch size and choose the torch threads for a batch and for a lone image by timing
    them (service.threads). Run it on the thread that will run the model (oneDNN kernels, handles
    and allocator state are per thread); `stop` ends it early (WarmupStopped) between two sizes.
    `auto` (--warmup auto): the eager CPU model warms only the sizes the thread timing runs."""
    few = torch.get_num_threads()
    if predictor.device.type == "cuda":  # the GPU does the math: no CPU thread timing
        n = min(few, CUDA_TORCH_THREADS)
        took = warm_at(predictor, sizes, (n,), stop)
        if getattr(predictor, "candidate", None) is not None:
            threads.settle_precision(predictor, sizes, n, n, stop, fp32_warm=True)
        log.info("warm-up of %d batch size(s) on %s took %.2fs; %d torch thread(s), the other cores "
                 "decode", len(sizes), predictor.device, took, n)
        return n, n
    timed_only = auto and predictor.eager_cpu
    chosen = threads.choose(predictor, sizes, all_threads, stop, timed_only)
    took = chosen.took_s
    warmed = warmed_sizes(predictor, sizes, auto)
    start = time.perf_counter()
    if getattr(predictor, "candidate", None) is not None:  # --precision auto with a candidate
        threads.settle_precision(predictor, warmed, chosen.batch, chosen.lone, stop, fp32_warm=True)
    if getattr(predictor, "runtime_candidate", None) is not None:  # --runtime auto with a candidate
        threads.settle_runtime(predictor, warmed, chosen.batch, chosen.lone, stop,
                               every_count=(few, all_threads))
    took += time.perf_counter() - start
    if timed_only:
        log.info("warm-up (eager CPU: the timed sizes only, --warmup pow2 for every power of two) took %.2fs",
                 took)
    else:
        log.info("warm-up of %d batch size(s) (%d..%d) took %.2fs", len(sizes), min(sizes), max(sizes), took)
    return chosen.batch, chosen.lone


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
            incoming=lambda: self.decoding,  # a batch short of full waits for these (service.batching)
        )
        self.reload_lock = asyncio.Lock()
        # Torch threads for a batch and for a lone image (batch of one, nothing queued): start-up
        # warm-up replaces these defaults with what it timed as faster (service.state.warm_up), and
        # real batches re-check that choice from then on (set_threads).
        self.tuner = ThreadTuner(settings.batch_threads, settings.lone_threads, settings.batch_threads,
                                 settings.lone_threads, enabled=False)  # set_threads, after warm-up
        self.ready = False
        self.draining = False
        self.failed: str | None = None  # why warm-up failed; the process is stopping then
        # Why the device became unusable (a sticky CUDA error): /healthz and /readyz answer 503
        # device_failed from then on, so the orchestrator replaces this replica.
        self.device_failed: str | None = None
        self.stopping = threading.Event()  # read by a warm-up still running on the inference thread
        self.decoding = 0  # images in the decode pool (event loop only); counts against queue_limit
        self.batches_run = 0  # model batches served (inference thread writes; memory.trim_when_idle reads)
        metrics.watch_queue(lambda: self.batcher.depth, settings.queue_limit)
        metrics.watch_threads(lambda: self.batch_threads, lambda: self.lone_threads)
        self._publish_model()

    def predicting(self) -> bool:
        """A prediction is decoding, queued, in a batch filling up or running (event loop; explanations
        and the runtime trial yield to it)."""
        return bool(self.decoding or self.batcher.depth or self.batcher.holding or self.batcher.busy)

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready and not self.draining and not self.device_failed else 0)

    def mark_device_failed(self, reason: str) -> None:
        if self.device_failed is None:
            log.critical("the device %s has failed (%s): /healthz and /readyz now answer 503 "
                         "device_failed; this replica must be replaced", self.device, reason)
        self.device_failed = reason
        self.metrics.ready.set(0)

    def start_draining(self) -> None:
        self.draining = True
        self.stopping.set()
        self.metrics.ready.set(0)

    def set_threads(self, batch: int, lone: int) -> None:
        """What warm-up chose; from now on re-checked on real batches (service/thread_tuner.py)."""
        s = self.settings
        cpu = self.device.type == "cpu"
        self.tuner = ThreadTuner(s.batch_threads, s.lone_threads, batch, lone, enabled=cpu)

    @property
    def batch_threads(self) -> int:
        return self.tuner.batch

    @property
    def lone_threads(self) -> int:
        return self.tuner.lone

    # ---- inference thread ---------------------------------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list[JobResult | NonFiniteOutput]:
        """Batch function (inference thread). Every job runs on the model its request started with
        (Job.predictor): a reload never answers one request with two models, and images decoded for
        the old preprocessing never meet the new model. Right after a swap a batch may hold both
        models' jobs; they run as two forward passes."""
        groups: dict[int, tuple[Predictor, list[int]]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.predictor), (job.predictor, []))[1].append(i)
        results: list[JobResult | NonFiniteOutput | None] = [None] * len(jobs)
        lone = len(jobs) == 1 and self.batcher.depth == 0
        threads = self.tuner.threads_for(lone)
        if threads != torch.get_num_threads():  # per-thread OpenMP setting: cheap, no pool rebuild
            torch.set_num_threads(threads)
        start = time.perf_counter()
        for predictor, rows in groups.values():
            try:
                out = predictor.run([jobs[i] for i in rows])
            except Exception as e:
                log.exception("inference failed for a batch of %d image(s) on %s", len(rows), predictor.name)
                reason = device_failure(e, predictor.device)
                if reason is not None:
                    self.mark_device_failed(reason)
                raise
            for i, r in zip(rows, out, strict=True):
                if isinstance(r, NonFiniteOutput):
                    log.error("%s (batch of %d); that request fails", r, len(rows))
                results[i] = r
        took = time.perf_counter() - start
        self.batches_run += 1
        self.tuner.observe(lone, threads, len(jobs), took)
        m = self.metrics
        m.stage["inference"].observe(took)
        m.batch_size.observe(len(jobs))
        return [r for r in results if r is not None]

    # ---- reload ------------------------------------------------------------------------------------------
    async def reload(self, path: Path) -> tuple[Predictor, Predictor]:
        """Swap in a new model; raises CheckpointError and keeps the old one when it does not load."""
        async with self.reload_lock:
            try:
                # Warm at the thread counts the inference thread uses; no re-timing under live traffic.
                threads = (self.batch_threads, self.lone_threads)
                tuned = (self.tuner.few, self.tuner.all)  # ONNX Runtime: a session for each, made now
                if self.settings.compile == "compile":
                    # torch.compile is not thread-safe: building graphs on a side thread while the
                    # inference thread runs compiled code can corrupt dynamo's state. Load aside, then
                    # compile on the inference thread itself, between batches (serving pauses meanwhile).
                    new = await asyncio.to_thread(build_predictor, self.settings, self.device, path)
                    sizes = self.settings.warmup_sizes()
                    await self.batcher.call_in_worker(warm_reloaded, new, sizes, threads, tuned)
                else:  # eager and TorchScript run safely beside a warm-up: no pause in serving
                    new = await asyncio.to_thread(build_predictor, self.settings, self.device, path, threads,
                                                  tuned)
            except (CheckpointError, PrecisionError):
                raise
            except Exception as e:  # warm-up failed: the file loaded but the model cannot run
                log.warning("reload of %s failed", path, exc_info=True)
                raise CheckpointError(f"{path}: the model failed its warm-up: {e}") from None
            old, self.predictor = self.predictor, new
            self.tuner.restart()
            self._publish_model()
            return old, new

    def publish_model(self) -> None:
        """The served model's info gauge (again after warm-up: --precision auto may change it)."""
        self._publish_model()

    def _publish_model(self) -> None:
        p = self.predictor
        self.metrics.set_model(p.name, p.version, p.meta.arch, str(p.device), p.precision, p.labels)

    async def close(self) -> None:
        await self.batcher.stop(timeout=self.settings.grace_period_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.convserve
    return state
