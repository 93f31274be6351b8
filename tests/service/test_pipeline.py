"""The pipeline on its own: a real batcher, decode pool and metrics, fakes for the model and the host.

Each behaviour both protocols rely on is asserted here once; test_predict/test_admission/
test_overload and test_v2_triton check the same over real HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import Preprocess
from service import pipeline
from service.batching import DynamicBatcher
from service.errors import ImageError
from service.http_errors import ServiceError
from service.inputs import Upload
from service.metrics import Metrics
from service.predictor import Job, JobResult
from tests import images


@dataclass
class FakeSettings:
    request_timeout_s: float = 5.0
    queue_limit: int = 8
    max_image_pixels: int = 10**7


class FakePredictor:
    """Answers every image with its own name as the top-1 label, so the test can tell models apart."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.labels = [name, "other"]
        self.preprocess = Preprocess(size=16, resize=16, mode="squash")
        self.ref = {"name": name, "version": "1", "sha256": "x"}


def _result(job: Job) -> JobResult:
    p: Any = job.predictor
    return JobResult(
        [{"label": p.name, "index": 0, "probability": 1.0}], None, 0.0, 0.0, 1, p.name, 1.0, p.ref
    )


@dataclass
class FakeHost:
    batch_fn: Callable[[list[Job]], list[JobResult]] = field(default=lambda jobs: [_result(j) for j in jobs])
    settings: Any = field(default_factory=FakeSettings)
    metrics: Metrics = field(default_factory=Metrics)
    decode_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2))
    predictor: Any = field(default_factory=lambda: FakePredictor("a"))
    ready: bool = True
    device_failed: str | None = None
    decoding: int = 0
    batches: list[list[Job]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def run(jobs: list[Job]) -> list[JobResult]:
            self.batches.append(jobs)
            return self.batch_fn(jobs)

        self.batcher: DynamicBatcher[Job, JobResult] = DynamicBatcher(
            run, max_size=8, max_wait_s=0.001, limit=self.settings.queue_limit, name="test",
            incoming=lambda: self.decoding,  # as service.state.ServiceState wires it
        )


async def _never() -> dict[str, str]:
    await asyncio.Event().wait()
    return {}


def _infer(
    host: FakeHost, entries: list[Any], *, receive: Callable[[], Awaitable[Any]] = _never, **kw: Any
) -> Any:
    async def scenario() -> Any:
        async with host.batcher:
            return await pipeline.infer(
                host,  # type: ignore[arg-type]
                entries,
                protocol=kw.pop("protocol", "v2"),
                receive=receive,
                start=time.perf_counter(),
                top_k=1,
                all_probs=False,
                all_or_nothing=kw.pop("all_or_nothing", False),
            )

    return asyncio.run(scenario())


def _rejected(host: FakeHost, reason: str, protocol: str = "v2") -> float:
    return host.metrics.rejected.labels(reason, protocol)._value.get()


def test_uploads_and_tensors_share_one_path() -> None:
    host = FakeHost()
    tensor = torch.zeros(3, 16, 16)
    out = _infer(host, [Upload(images.jpeg(), None), tensor])
    assert [r.top1_label for r in out.results] == ["a", "a"]
    assert host.batches[0][0].image.dtype == torch.uint8 and host.batches[0][1].image is tensor
    assert out.model["name"] == "a" and host.decoding == 0


def test_not_ready_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_decode_timed", lambda *a: pytest.fail("decoded while not ready"))
    with pytest.raises(ServiceError) as e:
        _infer(FakeHost(ready=False), [Upload(images.jpeg(), None)] * 2)
    assert e.value.code == "not_ready" and e.value.images == 2 and e.value.status == 503


def test_admission_counts_images_being_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_decode_timed", lambda *a: pytest.fail("decoded past the limit"))
    host = FakeHost(decoding=7)  # limit 8
    with pytest.raises(ServiceError) as e:
        _infer(host, [Upload(b"x", None)] * 2)
    assert e.value.code == "overloaded" and e.value.headers == {"Retry-After": "1"}


def test_a_bad_image_is_counted_and_its_neighbours_answered() -> None:
    host = FakeHost()
    out = _infer(host, [Upload(b"junk", None), Upload(images.jpeg(), None)], protocol="v1")
    bad, good = out.items
    assert isinstance(bad, ImageError) and bad.code == "corrupt_image" and bad.index == 0
    assert isinstance(good, JobResult)
    assert _rejected(host, "corrupt_image", "v1") == 1 and _rejected(host, "corrupt_image", "v2") == 0


def test_all_or_nothing_fails_naming_the_element_and_queues_nothing() -> None:
    host = FakeHost()
    entries = [Upload(images.jpeg(), None), Upload(b"junk", None), Upload(b"more junk", None)]
    with pytest.raises(ImageError) as e:
        _infer(host, entries, all_or_nothing=True)
    assert e.value.code == "corrupt_image" and e.value.index == 1
    assert host.batches == []
    assert _rejected(host, "corrupt_image") == 1  # the second bad one; the handler counts the raised one


def test_one_model_per_request_across_a_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    real = pipeline._decode_timed

    def decode_then_reload(*args: Any) -> Any:
        host.predictor = FakePredictor("b")  # a reload lands while the request is decoding
        return real(*args)

    monkeypatch.setattr(pipeline, "_decode_timed", decode_then_reload)
    out = _infer(host, [Upload(images.jpeg(), None)] * 2)
    assert [r.top1_label for r in out.results] == ["a", "a"] and out.predictor.name == "a"


def test_the_deadline_answers_timeout() -> None:
    release = threading.Event()

    def slow(jobs: list[Job]) -> list[JobResult]:
        release.wait(5)
        return [_result(j) for j in jobs]

    host = FakeHost(batch_fn=slow, settings=FakeSettings(request_timeout_s=0.2))
    try:
        with pytest.raises(ServiceError) as e:
            _infer(host, [torch.zeros(3, 16, 16)])
    finally:
        release.set()
    assert e.value.code == "timeout" and e.value.status == 504


def test_a_disconnect_drops_the_queued_work() -> None:
    started, release = threading.Event(), threading.Event()

    def hold(jobs: list[Job]) -> list[JobResult]:
        started.set()
        release.wait(5)
        return [_result(j) for j in jobs]

    host = FakeHost(batch_fn=hold)

    async def scenario() -> None:
        async with host.batcher:
            blocker = asyncio.ensure_future(
                host.batcher.submit(Job(torch.zeros(3, 16, 16), 1, False, host.predictor))
            )
            await asyncio.to_thread(started.wait, 5)  # the model is busy; our job waits in the queue

            async def gone() -> dict[str, str]:
                return {"type": "http.disconnect"}

            try:
                with pytest.raises(ServiceError) as e:
                    await pipeline.infer(
                        host,  # type: ignore[arg-type]
                        [torch.zeros(3, 16, 16)],
                        protocol="v2",
                        receive=gone,
                        start=time.perf_counter(),
                        top_k=1,
                        all_probs=False,
                        all_or_nothing=True,
                    )
                assert e.value.code == "client_disconnected"
            finally:
                release.set()
            await blocker

    asyncio.run(scenario())
    assert sum(len(b) for b in host.batches) == 1  # the dropped job never reached the model


def _decode_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """Record which thread each decode ran on and its `defer_above` (the real decode still runs)."""
    seen: list[tuple[str, int | None]] = []
    real = pipeline._decode_timed

    def recording(*args: Any) -> Any:
        seen.append((threading.current_thread().name, args[4] if len(args) > 4 else None))
        return real(*args)

    monkeypatch.setattr(pipeline, "_decode_timed", recording)
    return seen


def test_a_lone_small_upload_decodes_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _decode_threads(monkeypatch)
    host = FakeHost()
    out = _infer(host, [Upload(images.jpeg(), "image/jpeg")], protocol="v1")
    assert [r.top1_label for r in out.results] == ["a"]
    assert seen == [(threading.main_thread().name, pipeline.INLINE_PIXELS)]  # no pool hand-off
    assert host.batches[0][0].image.shape == (3, 16, 16) and host.decoding == 0
    bad = _infer(FakeHost(), [Upload(b"junk", None)], protocol="v1")  # errors come back the same way
    assert isinstance(bad.items[0], ImageError) and bad.items[0].code == "corrupt_image"


def test_many_pixels_in_few_bytes_and_several_uploads_use_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _decode_threads(monkeypatch)
    host = FakeHost()
    flat = images.encode(Image.new("RGB", (1024, 1024), (200, 30, 30)), "PNG")  # 1 MP in a few KiB
    assert len(flat) <= pipeline.INLINE_BYTES and pipeline.INLINE_PIXELS < 1024 * 1024
    out = _infer(host, [Upload(flat, "image/png")], protocol="v1")
    assert isinstance(out.items[0], JobResult)
    main = threading.main_thread().name
    assert seen[0] == (main, pipeline.INLINE_PIXELS)  # the header only, then handed on
    assert seen[1][0] != main and seen[1][1] is None
    seen.clear()
    _infer(FakeHost(), [Upload(images.jpeg(), None)] * 2)
    assert len(seen) == 2 and all(name != main for name, _ in seen)
    seen.clear()
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big = images.encode(Image.fromarray(noise, "RGB"), "JPEG", quality=95)  # 90k pixels, many bytes
    assert len(big) > pipeline.INLINE_BYTES
    _infer(FakeHost(), [Upload(big, None)])
    assert [name != main for name, _ in seen] == [True]


def _two_requests(host: FakeHost, second: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, float]:
    """Two one-image requests at once; the second's decode takes 0.3 s. Both through the pool."""
    monkeypatch.setattr(pipeline, "INLINE_BYTES", 0)
    real = pipeline._decode_timed

    def decode(data: bytes, *args: Any) -> Any:
        if data == second:
            time.sleep(0.3)
        return real(data, *args)

    monkeypatch.setattr(pipeline, "_decode_timed", decode)

    async def scenario() -> tuple[Any, Any, float]:
        async with host.batcher:
            host.batcher._per_item_s = 5.0  # as if a batch had taken 5 s per image: the wait's bound
            begin = time.perf_counter()
            calls = [pipeline.infer(host, [Upload(data, None)], protocol="v1", receive=_never,  # type: ignore[arg-type]
                                    start=begin, top_k=1, all_probs=False, all_or_nothing=False)
                     for data in (images.jpeg(), second)]
            a, b = await asyncio.gather(*calls)
            return a, b, time.perf_counter() - begin

    return asyncio.run(scenario())


def test_an_image_decoded_first_waits_for_one_still_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first image is ready 0.3 s before the second: they still run as one batch of two."""
    host = FakeHost()
    a, b, _ = _two_requests(host, images.png("RGB"), monkeypatch)
    assert isinstance(a.items[0], JobResult) and isinstance(b.items[0], JobResult)
    assert [len(batch) for batch in host.batches] == [2]


def test_an_image_that_fails_to_decode_does_not_hold_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second upload is junk: once its decode fails the first runs, long before the 5 s bound."""
    host = FakeHost()
    a, b, took = _two_requests(host, b"junk", monkeypatch)
    assert isinstance(a.items[0], JobResult) and b.items[0].code == "corrupt_image"
    assert [len(batch) for batch in host.batches] == [1]
    assert took < 2.5
