"""The dynamic batcher with bare functions: no HTTP, no torch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import DeadlineExceeded, DynamicBatcher, Overloaded


def test_concurrent_submits_share_one_batch() -> None:
    sizes: list[int] = []

    def double(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [2 * x for x in xs]

    async def scenario() -> list[int]:
        async with DynamicBatcher(double, max_size=4, max_wait_s=0.05, limit=8) as b:
            return await asyncio.gather(*(b.submit(i) for i in range(4)))

    assert asyncio.run(scenario()) == [0, 2, 4, 6]
    assert sizes == [4]


def test_max_size_splits_batches() -> None:
    sizes: list[int] = []

    def ident(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async def scenario() -> list[int]:
        async with DynamicBatcher(ident, max_size=3, max_wait_s=0, limit=16) as b:
            return await asyncio.gather(*(b.submit(i) for i in range(7)))

    assert asyncio.run(scenario()) == list(range(7))
    assert sizes == [3, 3, 1]


def test_lone_request_does_not_wait_for_the_window() -> None:
    """With a 60 s window, a lone item must still run at once (the test would time out otherwise)."""

    async def scenario() -> int:
        async with DynamicBatcher(lambda xs: xs, max_size=8, max_wait_s=60.0, limit=8) as b:
            return await asyncio.wait_for(b.submit(5), timeout=10)

    assert asyncio.run(scenario()) == 5


def test_items_arriving_while_busy_form_the_next_batch() -> None:
    release = threading.Event()
    sizes: list[int] = []

    def gated(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        if len(sizes) == 1:
            release.wait(10)  # hold the worker busy with the first batch
        return xs

    async def scenario() -> list[int]:
        async with DynamicBatcher(gated, max_size=8, max_wait_s=0, limit=16) as b:
            first = asyncio.ensure_future(b.submit(0))
            while not b.busy:
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
            await asyncio.sleep(0)
            assert b.depth == 5
            release.set()
            return [await first, *[await r for r in rest]]

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4, 5]
    assert sizes == [1, 5]


def test_full_queue_raises_overloaded_at_once_and_all_or_nothing() -> None:
    release = threading.Event()

    def gated(xs: list[int]) -> list[int]:
        release.wait(10)
        return xs

    async def scenario() -> None:
        async with DynamicBatcher(gated, max_size=1, max_wait_s=0, limit=2) as b:
            running = asyncio.ensure_future(b.submit(0))
            while not b.busy:
                await asyncio.sleep(0.001)
            queued = b.submit_many_nowait([1, 2])
            with pytest.raises(Overloaded):
                b.submit_many_nowait([3])
            assert b.depth == 2
            release.set()
            assert await running == 0
            assert await asyncio.gather(*queued) == [1, 2]
            # room again, but a multi-item submit larger than the free room takes nothing
            with pytest.raises(Overloaded):
                b.submit_many_nowait([4, 5, 6])
            assert b.depth == 0

    asyncio.run(scenario())


def test_exception_fails_only_its_batch() -> None:
    calls: list[list[int]] = []

    def flaky(xs: list[int]) -> list[int]:
        calls.append(xs)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return [x + 100 for x in xs]

    async def scenario() -> None:
        async with DynamicBatcher(flaky, max_size=4, max_wait_s=0, limit=8) as b:
            with pytest.raises(RuntimeError, match="model exploded"):
                await b.submit(1)
            assert await b.submit(2) == 102

    asyncio.run(scenario())


def test_an_exception_returned_for_one_item_fails_only_that_item() -> None:
    def odd_fails(xs: list[int]) -> list[int | Exception]:
        return [ValueError(f"item {x}") if x % 2 else x * 10 for x in xs]

    async def scenario() -> None:
        async with DynamicBatcher(odd_fails, max_size=4, max_wait_s=0.05, limit=8) as b:
            got = await asyncio.gather(*(b.submit(x) for x in (1, 2, 3, 4)), return_exceptions=True)
        assert [str(g) if isinstance(g, Exception) else g for g in got] == ["item 1", 20, "item 3", 40]

    asyncio.run(scenario())


def test_cancelled_and_expired_items_are_dropped_before_running() -> None:
    release = threading.Event()
    seen: list[int] = []

    def gated(xs: list[int]) -> list[int]:
        seen.extend(xs)
        if xs == [0]:
            release.wait(10)
        return xs

    async def scenario() -> None:
        async with DynamicBatcher(gated, max_size=8, max_wait_s=0, limit=8) as b:
            first = asyncio.ensure_future(b.submit(0))
            while not b.busy:
                await asyncio.sleep(0.001)
            (gone,) = b.submit_many_nowait([1])
            (late,) = b.submit_many_nowait([2], timeout=0.001)
            (kept,) = b.submit_many_nowait([3])
            gone.cancel()  # what the HTTP layer does when the client disconnects
            await asyncio.sleep(0.01)  # let the deadline of item 2 pass while the worker is busy
            release.set()
            assert await first == 0
            assert await kept == 3
            with pytest.raises(DeadlineExceeded):
                await late

    asyncio.run(scenario())
    assert seen == [0, 3]


def test_submit_timeout_cancels_the_item() -> None:
    release = threading.Event()
    seen: list[int] = []

    def gated(xs: list[int]) -> list[int]:
        seen.extend(xs)
        release.wait(10)
        return xs

    async def scenario() -> None:
        async with DynamicBatcher(gated, max_size=1, max_wait_s=0, limit=8) as b:
            first = asyncio.ensure_future(b.submit(0))
            while not b.busy:
                await asyncio.sleep(0.001)
            with pytest.raises(TimeoutError):
                await b.submit(1, timeout=0.01)
            release.set()
            await first

    asyncio.run(scenario())
    assert seen == [0]


def test_stop_finishes_queued_work() -> None:
    async def scenario() -> list[int]:
        b: DynamicBatcher[int, int] = DynamicBatcher(
            lambda xs: [x * 3 for x in xs], max_size=2, max_wait_s=0, limit=8
        )
        b.start()
        futures = b.submit_many_nowait([1, 2, 3])
        await b.stop(timeout=10)
        return [f.result() for f in futures]

    assert asyncio.run(scenario()) == [3, 6, 9]


@pytest.mark.parametrize("kwargs", [{"max_size": 0}, {"max_wait_s": -1.0}, {"limit": 0}])
def test_bad_arguments_are_refused(kwargs: dict[str, float]) -> None:
    args = {"max_size": 1, "max_wait_s": 0.0, "limit": 1, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DynamicBatcher(lambda xs: xs, **args)  # type: ignore[arg-type]


def test_cancelled_items_free_their_queue_slot_at_once() -> None:
    release = threading.Event()

    def gated(xs: list[int]) -> list[int]:
        release.wait(10)
        return xs

    async def scenario() -> None:
        async with DynamicBatcher(gated, max_size=1, max_wait_s=0, limit=1) as b:
            running = asyncio.ensure_future(b.submit(0))
            while not b.busy:
                await asyncio.sleep(0.001)
            (gone,) = b.submit_many_nowait([1])
            with pytest.raises(Overloaded):
                b.submit_many_nowait([2])
            gone.cancel()  # the client went away: its slot is free before the worker gets there
            await asyncio.sleep(0)
            assert b.depth == 0
            (kept,) = b.submit_many_nowait([3])
            release.set()
            assert await running == 0
            assert await kept == 3
            assert b.depth == 0

    asyncio.run(scenario())


def _warmed(b: DynamicBatcher[int, int], per_item_s: float) -> None:
    """As if the last batch had taken per_item_s per item (what bounds the wait for incoming items)."""
    b._per_item_s = per_item_s


def test_a_first_item_waits_for_items_still_decoding() -> None:
    """Three more are 'decoding' when the first is submitted: they arrive 20 ms later and all four
    run as one batch, not 1 then 3."""
    sizes: list[int] = []
    decoding = [3]

    def ident(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(ident, max_size=8, max_wait_s=0, limit=16, incoming=lambda: decoding[0])
        async with batcher as b:
            _warmed(b, 5.0)
            first = asyncio.ensure_future(b.submit(0))
            await asyncio.sleep(0.02)
            assert not sizes, "the first item ran alone while others were decoding"
            decoding[0] = 0
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 4)]
            return [await first, *[await r for r in rest]]

    assert asyncio.run(scenario()) == [0, 1, 2, 3]
    assert sizes == [4]


def test_a_decode_that_fails_releases_the_waiting_batch() -> None:
    """The one image decoding fails (never submitted): notify() lets the waiting item run at once,
    long before its 60 s bound."""
    sizes: list[int] = []
    decoding = [1]

    def ident(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async def scenario() -> int:
        batcher = DynamicBatcher(ident, max_size=8, max_wait_s=0, limit=16, incoming=lambda: decoding[0])
        async with batcher as b:
            _warmed(b, 60.0)
            first = asyncio.ensure_future(b.submit(7))
            await asyncio.sleep(0.02)
            assert not sizes
            decoding[0] = 0
            b.notify()
            return await asyncio.wait_for(first, timeout=10)

    assert asyncio.run(scenario()) == 7
    assert sizes == [1]


def test_the_wait_for_incoming_items_is_bounded_by_one_items_batch_time() -> None:
    """Items that stay 'decoding' forever hold a batch for one item's last time (50 ms), no longer."""
    sizes: list[int] = []

    def ident(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        async with DynamicBatcher(ident, max_size=8, max_wait_s=0, limit=16, incoming=lambda: 5) as b:
            _warmed(b, 0.05)
            start = loop.time()
            await asyncio.wait_for(b.submit(1), timeout=10)
            return loop.time() - start

    took = asyncio.run(scenario())
    assert 0.04 <= took < 5.0
    assert sizes == [1]


def test_the_wait_per_item_is_what_the_last_batch_took() -> None:
    """A first batch of 4 taking ~80 ms sets the bound to ~20 ms per item; a slow one later moves it
    a fifth of the way."""
    import time

    delays = [0.08, 0.5]

    def slow(xs: list[int]) -> list[int]:
        time.sleep(delays.pop(0))
        return xs

    async def scenario() -> tuple[float, float]:
        async with DynamicBatcher(slow, max_size=8, max_wait_s=0.05, limit=16) as b:
            await asyncio.gather(*(b.submit(i) for i in range(4)))
            first = b._per_item_s
            await b.submit(9)  # alone: 0.5 s for one item
            return first, b._per_item_s

    first, after = asyncio.run(scenario())
    assert 0.015 <= first < 0.2
    assert 0.8 * first + 0.2 * 0.5 <= after < 0.8 * first + 0.2 * 0.9


def test_the_time_per_item_leaves_out_waiting_behind_other_work_on_the_worker() -> None:
    """A batch queued 0.4 s behind a call_in_worker job (a runtime trial's pass, a reload's warm-up)
    records the batch function's own time, not those 0.4 s."""
    import time

    async def scenario() -> float:
        async with DynamicBatcher(lambda xs: xs, max_size=8, max_wait_s=0, limit=16) as b:
            other = asyncio.ensure_future(b.call_in_worker(time.sleep, 0.4))
            await asyncio.sleep(0.01)
            await b.submit(1)
            await other
            return b._per_item_s

    assert asyncio.run(scenario()) < 0.1


def test_a_batch_waiting_for_incoming_items_counts_as_holding() -> None:
    decoding = [1]

    async def scenario() -> tuple[bool, int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            lambda xs: xs, max_size=8, max_wait_s=0, limit=16, incoming=lambda: decoding[0]
        )
        async with batcher as b:
            _warmed(b, 60.0)
            first = asyncio.ensure_future(b.submit(3))
            await asyncio.sleep(0.02)
            held = b.holding and b.depth == 0 and not b.busy
            decoding[0] = 0
            b.notify()
            return held, await first

    assert asyncio.run(scenario()) == (True, 3)
