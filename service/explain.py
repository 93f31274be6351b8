"""Explanations (Grad-CAM) and feature maps on their own bounded queue, beside the prediction path.

Never inside a prediction batch: an explanation needs a backward pass through an unfolded fp32 model,
tens of times a prediction's cost, so it runs on its own few threads (`--explain-concurrency`, each
with `--explain-threads` torch threads), admitted against its own limit (`--explain-queue-limit`:
503 beyond it) and deadline (`--explain-timeout-s`: 504), and counted in its own metrics. The model
it runs is a copy of the checkpoint as trained (no batch-norm folding, no compile, fp32, CPU), loaded
from the served predictor's file the first time it is asked for and kept per predictor, so a reload
brings a fresh copy and an explanation never mixes two models.

The Grad-CAM layer is found automatically (service/gradcam.py); a checkpoint may name it with the
`explain_layer` key of its `arch_config` (a module path such as `layer4` or `features.14`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram

from model.checkpoint import CheckpointError, load_checkpoint
from service import heatmaps
from service.decode import decode_to_tensor
from service.gradcam import LAYER_KEY, ExplainModel, LayerNotFound
from service.metrics import LATENCY_BUCKETS, Metrics
from service.predictor import Predictor
from service.settings import Settings

log = logging.getLogger(__name__)
CAM_GRID = 16  # the heat map's numeric grid in the JSON answer: small, and the same for every model
YIELD_POLL_S = 0.001  # how often a yielding explanation looks for a gap (one waiter per explain thread)
YIELD_GAP_S = 0.002  # a gap between predictions: longer than a loopback client's turnaround


class ExplainOverloaded(Exception):
    """More explanations running or waiting than --explain-queue-limit."""


class ExplainTimeout(Exception):
    """No answer within --explain-timeout-s."""


class ExplainMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.requests = Counter(
            "convserve_explanations", "Explanation requests by kind (gradcam, features) and outcome",
            ["kind", "outcome"], registry=r,
        )
        self.duration = Histogram(
            "convserve_explanation_duration_seconds", "Explanation latency (admission to answer)",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.rejected = Counter(
            "convserve_explanation_rejected", "Explanations refused, by reason", ["reason"], registry=r
        )
        self.depth = Gauge("convserve_explanation_queue_depth", "Explanations running or waiting", registry=r)
        for reason in ("overloaded", "timeout", "bad_input", "not_ready", "shutting_down"):
            self.rejected.labels(reason)


@dataclass(frozen=True)
class Explained:
    """What an explanation hands the route; PNGs are bytes, the route encodes them."""

    cam: torch.Tensor  # (h, w) in [0, 1]
    probs: torch.Tensor  # (K,) softmax of the logits
    target: int
    layer: str
    input_png: bytes
    heatmap_png: bytes
    overlay_png: bytes
    seconds: float


class Explainer:
    def __init__(
        self, settings: Settings, metrics: Metrics, predicting: Callable[[], bool] = lambda: False
    ) -> None:
        self.settings = settings
        self.metrics = ExplainMetrics(metrics)
        # True while a prediction is decoding, queued or running: an explanation about to start waits
        # (up to --explain-yield-ms) for a moment when it is False (see _yield_to_predictions).
        self.predicting = predicting
        self._slots = asyncio.Semaphore(settings.explain_concurrency)  # one per explain thread
        threads = settings.explain_threads
        # torch.set_num_threads in a worker applies to that thread's parallel regions (OpenMP), so the
        # prediction thread keeps its own count.
        self.pool = ThreadPoolExecutor(
            settings.explain_concurrency, thread_name_prefix="explain",
            initializer=_explain_thread, initargs=(threads,),
        )
        self.pending = 0  # event loop only
        self.closed = False
        self._models: dict[int, tuple[Predictor, ExplainModel]] = {}
        self._load_lock = threading.Lock()
        self.metrics.depth.set_function(lambda: float(self.pending))

    # ---- event loop -------------------------------------------------------------------------------------
    async def submit(self, kind: str, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on an explain thread, bounded by the queue limit and the deadline."""
        s = self.settings
        if self.pending >= s.explain_queue_limit:
            self.metrics.rejected.labels("overloaded").inc()
            raise ExplainOverloaded(
                f"{self.pending} explanation(s) running or waiting, limit {s.explain_queue_limit}"
            )
        deadline = time.perf_counter() + s.explain_timeout_s
        start = time.perf_counter()
        self.pending += 1
        try:
            async with asyncio.timeout(s.explain_timeout_s):
                # A slot per explain thread: the wait for a gap happens right before the job starts
                # on a thread, not while it sits behind others in the pool's queue.
                async with self._slots:
                    await self._yield_to_predictions()
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(self.pool, _until, deadline, fn, *args)
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise ExplainTimeout(f"no explanation within {s.explain_timeout_s:g}s") from None
        finally:
            self.pending -= 1
        self.metrics.duration.labels(kind).observe(time.perf_counter() - start)
        return result

    async def _yield_to_predictions(self) -> None:
        """Wait until no prediction has been in flight for YIELD_GAP_S, or --explain-yield-ms passed.

        On a few cores an explanation (a backward pass on one thread, its Python work holding the GIL,
        three PNGs) slows every prediction that overlaps it; niceness alone did not stop 4 explaining
        clients from doubling the default convnet's prediction median on 2 cores (docs/ui.md). A gap
        must last a little: a closed-loop client leaves a fraction of a millisecond between its
        requests, and an explanation started there overlaps the next prediction whole. The bound
        keeps explanations from starving under a steady prediction stream: they then start at most
        that long apart."""
        budget = self.settings.explain_yield_ms / 1000.0
        if budget <= 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + budget
        quiet_since: float | None = None
        while (now := loop.time()) < until:
            if self.predicting():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= YIELD_GAP_S:
                return
            await asyncio.sleep(YIELD_POLL_S)

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- explain threads ---------------------------------------------------------------------------------
    def model_for(self, predictor: Predictor) -> ExplainModel:
        """The explain copy of the predictor's model, loaded once per predictor (thread-safe)."""
        with self._load_lock:
            hit = self._models.get(id(predictor))
            if hit is not None and hit[0] is predictor:
                return hit[1]
            loaded = load_checkpoint(predictor.path)
            if loaded.meta.weights_sha256 != predictor.meta.weights_sha256:
                raise CheckpointError(
                    f"{predictor.path} changed on disk since it was loaded; reload the model to explain it"
                )
            layer = (loaded.meta.arch_config or {}).get(LAYER_KEY)
            named = layer if isinstance(layer, str) else None
            model = ExplainModel(loaded.model, predictor.input_shape, named)
            self._models = {id(predictor): (predictor, model)}  # only the current model is kept
            log.info("explanations for %s: Grad-CAM on %r", predictor.name, model.cam_layer)
            return model

    def decode(self, predictor: Predictor, data: bytes, content_type: str | None) -> torch.Tensor:
        return decode_to_tensor(data, predictor.preprocess, self.settings.max_image_pixels, content_type)

    def explain(
        self, predictor: Predictor, data: bytes, content_type: str | None, target: int | None
    ) -> Explained:
        start = time.perf_counter()
        image = self.decode(predictor, data, content_type)  # (C, H, W) uint8, what the model sees
        model = self.model_for(predictor)
        x = predictor.preprocess.normalize(image[None])  # (1, C, H, W) float32
        cam, logits, target = model.grad_cam(x, target)
        _, h, w = image.shape
        rgb = heatmaps.input_rgb(image)
        heat = heatmaps.upsample(cam, h, w)
        return Explained(
            cam=cam,
            probs=predictor.probabilities(logits),  # calibrated exactly as /v1/predict answers
            target=target,
            layer=model.cam_layer,
            input_png=heatmaps.png(rgb),
            heatmap_png=heatmaps.png(heatmaps.colorize(heat)),
            overlay_png=heatmaps.png(heatmaps.overlay(rgb, heat)),
            seconds=time.perf_counter() - start,
        )

    def features(
        self, predictor: Predictor, data: bytes, content_type: str | None, layer: str | None
    ) -> dict[str, Any]:
        start = time.perf_counter()
        image = self.decode(predictor, data, content_type)
        model = self.model_for(predictor)
        fm = model.feature_maps(predictor.preprocess.normalize(image[None]), layer)
        _, h, w = fm.maps.shape
        scale = max(1, min(4, 48 // max(h, w)))  # small maps are enlarged so a grey tile is visible
        grid, cols, shown = heatmaps.feature_grid(fm.maps, scale=scale)
        return {
            "layer": fm.layer,
            "layers": model.convs,
            "kernel_size": list(fm.kernel_size),
            "stride": list(fm.stride),
            "padding": fm.padding if isinstance(fm.padding, str) else list(fm.padding),
            "in_channels": fm.in_channels,
            "out_channels": fm.out_channels,
            "input_size": [int(image.shape[1]), int(image.shape[2])],
            "output_size": [h, w],
            "channels_shown": shown,
            "columns": cols,
            "png": grid_png(grid),
            "ms": round((time.perf_counter() - start) * 1000, 3),
        }


def _explain_thread(threads: int) -> None:
    """Set up an explain worker: its own torch thread count, and a lower CPU priority (nice +10 for
    this thread only, Linux), so that when predictions and explanations compete for the cores the
    scheduler favours predictions. Lowering one's own priority needs no privilege."""
    torch.set_num_threads(threads)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: explanations just run at par
        log.debug("could not lower the explain thread's priority", exc_info=True)


def grid_png(grid: Any) -> bytes:
    return heatmaps.png(grid)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _until(deadline: float, fn: Any, *args: Any) -> Any:
    """A job that waited past its deadline is skipped: its client already has its 504."""
    if time.perf_counter() > deadline:
        raise ExplainTimeout("the explanation's deadline passed while it waited")
    return fn(*args)


__all__ = ["ExplainOverloaded", "ExplainTimeout", "Explainer", "LayerNotFound", "b64"]
