"""The batcher's edges: a stop that times out fails every pending future (queued and running), and
the fill window (max_wait with a partial batch)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import BatcherClosed, DynamicBatcher


def test_a_stop_that_times_out_resolves_queued_and_running_futures() -> None:
    release = threading.Event()

    def stuck(xs: list[int]) -> list[int]:
        release.wait(30)  # the model hangs on this batch
        return xs

    async def scenario() -> list[BaseException | int]:
        b: DynamicBatcher[int, int] = DynamicBatcher(stuck, max_size=2, max_wait_s=0, limit=8)
        b.start()
        running = b.submit_many_nowait([1, 2])
        await asyncio.sleep(0)
        while not b.busy:
            await asyncio.sleep(0.005)
        queued = b.submit_many_nowait([3])
        try:
            await b.stop(timeout=0.1)
        finally:
            release.set()
        # every future is already resolved: nothing waits for a batch that will never be answered
        assert all(f.done() for f in [*running, *queued])
        return await asyncio.gather(*running, *queued, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert len(results) == 3
    assert all(isinstance(r, BatcherClosed) for r in results), results


def test_a_partial_batch_waits_for_the_fill_window_and_fills_up() -> None:
    sizes: list[int] = []

    def record(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [x * 10 for x in xs]

    async def scenario() -> tuple[list[int], float]:
        loop = asyncio.get_running_loop()
        # a long window and max_size 3: the batch goes as soon as the third item joins
        async with DynamicBatcher(record, max_size=3, max_wait_s=30, limit=8) as b:
            first = b.submit_many_nowait([1, 2])
            await asyncio.sleep(0.05)
            late = b.submit_many_nowait([3])
            out = await asyncio.wait_for(asyncio.gather(*first, *late), 10)
        # a short window that never fills: the partial batch goes when the window ends
        async with DynamicBatcher(record, max_size=4, max_wait_s=0.2, limit=8) as b:
            start = loop.time()
            await asyncio.gather(*b.submit_many_nowait([4, 5]))
            waited = loop.time() - start
        return out, waited

    out, waited = asyncio.run(scenario())
    assert out == [10, 20, 30]
    assert sizes == [3, 2]
    assert waited >= 0.2 * 0.95  # it did wait for the window (a lower bound, not a speed claim)


@pytest.mark.parametrize("max_wait_s", [0.0])
def test_no_fill_window_runs_what_is_there(max_wait_s: float) -> None:
    sizes: list[int] = []

    def record(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async def scenario() -> None:
        async with DynamicBatcher(record, max_size=4, max_wait_s=max_wait_s, limit=8) as b:
            await asyncio.gather(*b.submit_many_nowait([1, 2]))

    asyncio.run(scenario())
    assert sizes == [2]


def test_abandon_fails_queued_and_running_futures_at_once_and_takes_no_more() -> None:
    """What a drain does when its grace period runs out: every caller is answered now (the HTTP
    layer turns BatcherClosed into 503 shutting_down), the running batch's late result is dropped."""
    release = threading.Event()
    seen: list[list[int]] = []

    def stuck(xs: list[int]) -> list[int]:
        seen.append(xs)
        release.wait(30)
        return xs

    async def scenario() -> None:
        b: DynamicBatcher[int, int] = DynamicBatcher(stuck, max_size=2, max_wait_s=0, limit=8)
        b.start()
        running = b.submit_many_nowait([1, 2])
        while not b.busy:
            await asyncio.sleep(0.005)
        queued = b.submit_many_nowait([3, 4, 5])
        assert b.abandon(BatcherClosed("grace over")) == 5
        assert all(f.done() for f in [*running, *queued])
        with pytest.raises(BatcherClosed):
            b.submit_many_nowait([6])
        release.set()
        await b.stop(timeout=10)  # the worker ends after the running batch, which is dropped
        results = await asyncio.gather(*running, *queued, return_exceptions=True)
        assert all(isinstance(r, BatcherClosed) for r in results), results

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert seen == [[1, 2]]  # the queued items never ran
