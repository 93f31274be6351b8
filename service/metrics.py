"""Prometheus metrics on the app's own CollectorRegistry (never the global one: tests start many apps).

The names are a contract with the deploy dashboards and alerts; see the README's metrics table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import TypeVar

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STAGES = ("decode", "queue", "inference", "response")
log = logging.getLogger(__name__)
_T = TypeVar("_T")


class _GpuMemoryCollector(Collector):
    """Read at scrape time, per serving device: what this process's caching allocator holds
    (allocated by tensors, reserved in all) and the driver's device-wide used/total.

    A read that raises (a driver hiccup, a device that has failed) is logged and counted in
    convserve_gpu_metrics_errors_total, and the series it would have given are left out of that
    scrape: /metrics as a whole must never fail, or Prometheus loses every series, not just these."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices
        # counted here and yielded after this scrape's reads, so a scrape shows its own failures
        self.failures = {str(d): 0 for d in devices}

    def describe(self) -> Iterable[Metric]:
        # The registry calls describe() at registration; without it, it would collect (read the GPU).
        return [*self._families().values(), self._failures()]

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for dev in self.devices:
            name = str(dev)
            allocated = self._read(name, "memory_allocated", partial(torch.cuda.memory_allocated, dev))
            if allocated is not None:
                families["allocated"].add_metric([name], float(allocated))
            reserved = self._read(name, "memory_reserved", partial(torch.cuda.memory_reserved, dev))
            if reserved is not None:
                families["reserved"].add_metric([name], float(reserved))
            info = self._read(name, "mem_get_info", partial(torch.cuda.mem_get_info, dev))
            if info is not None:
                free, size = info
                families["used"].add_metric([name], float(size - free))
                families["total"].add_metric([name], float(size))
        yield from families.values()
        yield self._failures()

    def _failures(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "convserve_gpu_metrics_errors",
            "GPU memory reads that failed at scrape time (their series were left out of that scrape)",
            labels=["device"],
        )
        for device, n in self.failures.items():
            family.add_metric([device], float(n))
        return family

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            "allocated": GaugeMetricFamily(
                "convserve_gpu_memory_allocated_bytes",
                "GPU memory held by this process's tensors (torch.cuda.memory_allocated)",
                labels=["device"],
            ),
            "reserved": GaugeMetricFamily(
                "convserve_gpu_memory_reserved_bytes",
                "GPU memory this process's caching allocator holds (torch.cuda.memory_reserved): "
                "what the alert watches",
                labels=["device"],
            ),
            "used": GaugeMetricFamily(
                "convserve_gpu_memory_used_bytes",
                "GPU memory in use on the device (all processes, as the driver reports it)",
                labels=["device"],
            ),
            "total": GaugeMetricFamily(
                "convserve_gpu_memory_total_bytes", "GPU memory on the device", labels=["device"]
            ),
        }

    def _read(self, device: str, what: str, read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except Exception as e:
            self.failures[device] += 1
            log.warning("GPU metrics: reading %s on %s failed: %s", what, device, e)
            return None


class Metrics:
    def __init__(self) -> None:
        # No `_created` series: they double the series count and dashboards here never use them.
        disable_created_metrics()
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.requests = Counter(
            "convserve_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "convserve_request_duration_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "convserve_stage_duration_seconds",
            "Time per stage: decode and queue per image, inference per batch, response per request",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.stage = {s: self.stage_duration.labels(s) for s in STAGES}
        self.batch_size = Histogram(
            "convserve_batch_size", "Images per model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("convserve_queue_depth", "Images waiting for the model", registry=r)
        self.queue_limit = Gauge("convserve_queue_limit", "Configured queue limit (images)", registry=r)
        self.in_flight = Gauge(
            "convserve_in_flight_requests", "Prediction requests being handled", registry=r
        )
        self.rejected = Counter(
            "convserve_rejected_images",
            "Images rejected, by reason (the error code) and protocol (v1, v2)",
            ["reason", "protocol"],
            registry=r,
        )
        self.predictions = Counter(
            "convserve_predictions", "Predictions by top-1 label", ["label"], registry=r
        )
        self.top1_confidence = Histogram(
            "convserve_top1_confidence", "Top-1 probability", buckets=CONFIDENCE_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "convserve_model_info",
            "The model being served (value is always 1)",
            ["name", "version", "architecture", "device", "precision"],
            registry=r,
        )
        self.ready = Gauge("convserve_ready", "1 when the service is warmed up and not draining", registry=r)
        self.torch_threads = Gauge(
            "convserve_torch_threads",
            "Torch intra-op threads in use for a batch and for a lone image (warm-up's choice, "
            "re-checked on real batches)",
            ["kind"],
            registry=r,
        )
        self.reloads = Counter(
            "convserve_reloads",
            "Model reloads by trigger (watch: the checkpoint file changed; api: POST /v1/model/reload) "
            "and result (ok, or refused: the old model kept serving)",
            ["trigger", "result"],
            registry=r,
        )
        self.memory_returned = Counter(
            "convserve_memory_returned_bytes",
            "Freed heap memory handed back to the OS after a burst of requests, once idle "
            "(malloc_trim; service/memory.py)",
            registry=r,
        )
        self.memory_trims = Counter(
            "convserve_memory_trims", "Heap trims once idle after requests (service/memory.py)", registry=r
        )
        for trigger in ("watch", "api"):  # every series at 0, so increase() sees the first one
            for result in ("ok", "refused"):
                self.reloads.labels(trigger, result)
        self._label_counters: dict[str, Counter] = {}

    def init_reasons(self, reasons: Iterable[str], protocols: Iterable[str]) -> None:
        """Create every reason of every protocol at 0 so rate() works from the first rejection."""
        for protocol in protocols:
            for reason in reasons:
                self.rejected.labels(reason, protocol)

    def watch_threads(self, batch: Callable[[], int], lone: Callable[[], int]) -> None:
        self.torch_threads.labels("batch").set_function(lambda: float(batch()))
        self.torch_threads.labels("lone").set_function(lambda: float(lone()))

    def watch_queue(self, depth: Callable[[], int], limit: int) -> None:
        self.queue_depth.set_function(lambda: float(depth()))
        self.queue_limit.set(limit)

    def set_model(
        self, name: str, version: str, arch: str, device: str, precision: str, labels: list[str]
    ) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, arch, device, precision).set(1)
        # Per-label series are bounded by the class count; a model with other labels starts afresh.
        known = set(self.predictions._metrics)
        wanted = {(label,) for label in labels}
        if known != wanted:
            self.predictions.clear()
            for label in labels:
                self.predictions.labels(label)

    def watch_gpus(self, devices: list[torch.device]) -> None:
        self.registry.register(_GpuMemoryCollector(devices))

    def render(self) -> bytes:
        return generate_latest(self.registry)
