"""Explanations start in the gaps between predictions, but never wait longer than --explain-yield-ms.

The Explainer is the unit under test (its real queue, slots and thread pool); its neighbour, "is a
prediction in flight?", is a fake the test flips.
"""

from __future__ import annotations

import asyncio
import threading

from service.explain import Explainer
from service.metrics import Metrics
from service.settings import Settings


def explainer(yield_ms: float, predicting: list[bool]) -> Explainer:
    settings = Settings.model_construct(explain_yield_ms=yield_ms)  # defaults, no checkpoint needed
    return Explainer(settings, Metrics(), predicting=lambda: predicting[0])


def test_an_explanation_waits_for_the_predictions_in_flight_to_finish() -> None:
    predicting = [True]
    seen: list[bool] = []
    ex = explainer(5_000, predicting)  # far longer than the test: only the gap can release it

    async def scenario() -> None:
        job = asyncio.create_task(ex.submit("gradcam", lambda: seen.append(predicting[0]) or "done"))
        await asyncio.sleep(0.05)
        assert not seen, "the explanation started while a prediction was in flight"
        predicting[0] = False  # the prediction finished
        assert await asyncio.wait_for(job, 2) == "done"

    try:
        asyncio.run(scenario())
    finally:
        ex.close()
    assert seen == [False]


def test_under_a_steady_prediction_stream_it_starts_after_the_bound() -> None:
    predicting = [True]  # never a gap
    ex = explainer(30, predicting)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(ex.submit("gradcam", lambda: "done"), 5) == "done"
        return loop.time() - start

    try:
        waited = asyncio.run(scenario())
    finally:
        ex.close()
    assert waited >= 0.03  # it did yield for the whole bound (a lower bound: never a timing ceiling)


def test_zero_turns_the_yield_off() -> None:
    predicting = [True]
    release = threading.Event()
    ex = explainer(0, predicting)

    async def scenario() -> str:
        job = asyncio.create_task(ex.submit("gradcam", lambda: release.wait(5) and "done"))
        await asyncio.sleep(0)
        release.set()
        return await asyncio.wait_for(job, 5)

    try:
        assert asyncio.run(scenario()) == "done"
    finally:
        ex.close()


def test_queued_explanations_each_yield_before_they_start() -> None:
    """With one explain thread, the second of two queued explanations must also wait for a gap: the
    wait happens when a slot frees, not once at admission while it sits in the pool's queue."""
    predicting = [False]
    order: list[str] = []
    ex = explainer(5_000, predicting)

    def first() -> str:
        predicting[0] = True  # a prediction arrives while the first explanation runs
        order.append("first")
        return "first"

    async def scenario() -> None:
        a = asyncio.create_task(ex.submit("gradcam", first))
        b = asyncio.create_task(ex.submit("gradcam", lambda: order.append("second") or "second"))
        assert await asyncio.wait_for(a, 2) == "first"
        await asyncio.sleep(0.05)
        assert order == ["first"], "the queued explanation started while a prediction was in flight"
        predicting[0] = False
        assert await asyncio.wait_for(b, 2) == "second"

    try:
        asyncio.run(scenario())
    finally:
        ex.close()
