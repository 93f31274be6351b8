"""The dynamic batcher: gathers submitted items into batches for one worker thread.

asyncio and the standard library only: no FastAPI, no torch, so it is tested with a bare function.

Policy (why it looks like this):
- The queue is bounded and `submit` never waits for room: a full queue raises `Overloaded` at once,
  so the HTTP layer can answer 503 instead of letting latency grow without bound.
- A request arriving while the worker is idle runs at once, alone: waiting out a batching window
  when nothing else is queued only adds latency.
- Except while other images are still decoding (`incoming`, the HTTP layer's count): then a batch
  short of full waits for them, up to one image's share of a batch's time (smoothed). That is the
  break-even: an image arriving just after a lone one started would wait that long anyway, and
  closed-loop clients answered together send again together, so the first image decoded would
  otherwise run alone and the rest form the next batch (16 clients on resnet18: batches of 2 and
  14 alternating instead of 16s).
- Items that arrive while the worker is busy accumulate and go together in the next batch. When
  that batch is not full (there is concurrent traffic, and more is likely on its way) it may wait
  up to `max_wait_s` for stragglers.
- Just before a batch runs, items whose future is already done (the caller timed out or its client
  went away and cancelled it) are dropped, and items past their deadline fail with
  `DeadlineExceeded`: the model never spends time on answers nobody will read.
- An exception in the batch function fails that batch's items only; the next batch proceeds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")


class Overloaded(Exception):
    """The queue is full; try again later."""


class DeadlineExceeded(Exception):
    """The item's deadline passed before the worker got to it."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(slots=True)
class _Entry(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    deadline: float  # loop.time() seconds; inf = none
    queued: bool = True
    dead: bool = False  # cancelled while still queued (counted in DynamicBatcher._dead)


class DynamicBatcher(Generic[In, Out]):
    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out | Exception]],
        *,
        max_size: int,
        max_wait_s: float,
        limit: int,
        executor: Executor | None = None,
        name: str = "batcher",
        incoming: Callable[[], int] = lambda: 0,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._fn = fn
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.limit = limit
        self._incoming = incoming  # items about to be submitted (still decoding); call notify() as it falls
        # Batches' wall time per item, smoothed (one slow batch, a pause, moves it a fifth of the
        # way): how long a batch short of full waits for items still decoding.
        self._per_item_s = 0.0
        self._own_executor = executor is None
        # One worker thread: whatever `fn` touches (the model) is only ever used from that thread.
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=name)
        self._queue: deque[_Entry[In, Out]] = deque()
        self._dead = 0  # queued entries whose caller has gone: they hold no capacity
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.busy = False  # the worker is running a batch
        # The batch being filled or run: a stop that times out cancels the worker, and these
        # futures live nowhere else, so they must be failed here too, not only the queued ones.
        self._current: list[_Entry[In, Out]] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued (up to `timeout`), then stop the worker."""
        self._closing = True
        self._wakeup.set()
        timed_out = False
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                timed_out = True
                log.warning("batcher: %d queued item(s) not finished in %.1fs", len(self._queue), timeout)
                self._task.cancel()
                self._fail_all(BatcherClosed("the server is shutting down"))
        if self._own_executor:
            # After a timeout the worker thread may still be inside the hung batch: waiting for it
            # here would block the event loop and defeat the timeout.
            self._executor.shutdown(wait=not timed_out, cancel_futures=timed_out)

    def abandon(self, exc: Exception) -> int:
        """Take no new work and fail every pending future with `exc` now, queued and running (the
        running batch's result is dropped when it comes); the worker ends after that batch. For a
        drain whose grace period ran out: the callers answer at once instead of being cancelled
        by the server's shutdown. Returns how many futures were failed."""
        self._closing = True
        self._wakeup.set()
        pending = sum(not e.future.done() for e in [*self._current, *self._queue])
        self._fail_all(exc)
        return pending

    async def __aenter__(self) -> DynamicBatcher[In, Out]:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def call_in_worker(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn on the worker thread (e.g. a warm-up that must happen where the model will run)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- submitting --------------------------------------------------------------------------------
    @property
    def holding(self) -> bool:
        """A batch is taken from the queue and waiting to fill, or running."""
        return bool(self._current)

    @property
    def depth(self) -> int:
        """Items waiting (not counting the batch the worker is running, nor cancelled ones)."""
        return len(self._queue) - self._dead

    def notify(self) -> None:
        """`incoming` changed without a submit (an image failed to decode): look at it again."""
        self._wakeup.set()

    def submit_many_nowait(
        self, items: Sequence[In], timeout: float | None = None
    ) -> list[asyncio.Future[Out]]:
        """Queue all items or none (raises `Overloaded`); returns one future per item."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self.depth + len(items) > self.limit:
            raise Overloaded(f"queue full ({self.depth} of {self.limit} waiting)")
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        futures: list[asyncio.Future[Out]] = []
        for item in items:
            future: asyncio.Future[Out] = loop.create_future()
            entry = _Entry(item, future, deadline)
            future.add_done_callback(lambda _, e=entry: self._on_done(e))  # type: ignore[misc]
            self._queue.append(entry)
            futures.append(future)
        self._wakeup.set()
        return futures

    async def submit(self, item: In, timeout: float | None = None) -> Out:
        """Queue one item and wait for its result; `timeout` also drops it if not yet started."""
        (future,) = self.submit_many_nowait([item], timeout)
        if timeout is None:
            return await future
        async with asyncio.timeout(timeout):
            return await future  # a timeout cancels the future, so the batcher drops the item

    # ---- the loop ------------------------------------------------------------------------------------
    def _on_done(self, entry: _Entry[In, Out]) -> None:
        if entry.queued and not entry.dead:  # cancelled before the worker took it: free its slot now
            entry.dead = True
            self._dead += 1

    def _pop(self) -> _Entry[In, Out]:
        entry = self._queue.popleft()
        entry.queued = False
        if entry.dead:
            self._dead -= 1
        return entry

    def _take(self, room: int, now: float) -> list[_Entry[In, Out]]:
        taken: list[_Entry[In, Out]] = []
        while self._queue and len(taken) < room:
            entry = self._pop()
            if self._alive(entry, now):
                taken.append(entry)
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._current = self._take(self.max_size, loop.time())
            if len(batch) < self.max_size and self._incoming() > 0:
                await self._await_incoming(batch, loop)
            if 1 < len(batch) < self.max_size and self.max_wait_s > 0:
                await self._fill(batch, loop)
            batch = self._current = self._still_wanted(batch, loop.time())  # some left while it filled
            if batch:
                await self._dispatch(batch, loop)
            self._current = []

    async def _fill(self, batch: list[_Entry[In, Out]], loop: asyncio.AbstractEventLoop) -> None:
        """Concurrent traffic: wait up to max_wait_s for the batch to fill."""
        await self._wait_for_more(batch, loop, self.max_wait_s, lambda: True)

    async def _await_incoming(self, batch: list[_Entry[In, Out]], loop: asyncio.AbstractEventLoop) -> None:
        """Images still decoding will be submitted soon: wait for them, up to one item's time."""
        await self._wait_for_more(batch, loop, self._per_item_s, lambda: self._incoming() > 0)

    async def _wait_for_more(
        self, batch: list[_Entry[In, Out]], loop: asyncio.AbstractEventLoop, for_s: float,
        coming: Callable[[], bool],
    ) -> None:
        """Add what is submitted to `batch` until it is full, `for_s` has passed (or the first
        deadline in it), `coming` is false, or every caller in it has gone."""
        until = min([loop.time() + for_s, *(e.deadline for e in batch)])
        while len(batch) < self.max_size and coming() and not self._closing:
            if all(e.future.done() for e in batch):
                return
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            batch.extend(self._take(self.max_size - len(batch), loop.time()))

    @staticmethod
    def _alive(entry: _Entry[In, Out], now: float) -> bool:
        """False for an entry whose caller gave up (cancelled: timed out or its client disconnected)
        or whose deadline passed (failed here, so the caller gets its 504)."""
        if entry.future.done():
            return False
        if entry.deadline <= now:
            entry.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            return False
        return True

    @classmethod
    def _still_wanted(cls, batch: list[_Entry[In, Out]], now: float) -> list[_Entry[In, Out]]:
        return [e for e in batch if cls._alive(e, now)]

    async def _dispatch(self, batch: list[_Entry[In, Out]], loop: asyncio.AbstractEventLoop) -> None:
        self.busy = True
        try:
            outs, took = await loop.run_in_executor(self._executor, self._timed, [e.item for e in batch])
            per_item = took / len(batch)
            self._per_item_s = per_item if not self._per_item_s else 0.8 * self._per_item_s + 0.2 * per_item
            if len(outs) != len(batch):
                raise RuntimeError(f"batch function returned {len(outs)} results for {len(batch)} items")
        except Exception as exc:  # fail this batch only; the loop goes on with the next one
            log.debug("batch of %d failed: %r", len(batch), exc)
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        finally:
            self.busy = False
        for e, out in zip(batch, outs, strict=True):
            if e.future.done():
                continue
            if isinstance(out, Exception):  # the batch function failed this one item, not the batch
                e.future.set_exception(out)
            else:
                e.future.set_result(out)

    def _timed(self, items: list[In]) -> tuple[Sequence[Out | Exception], float]:
        """The batch function and its time, measured on the worker thread: not the time the batch
        waited there behind other work (call_in_worker: a runtime trial's pass, a reload's warm-up)."""
        start = time.perf_counter()
        outs = self._fn(items)
        return outs, time.perf_counter() - start

    def _fail_all(self, exc: Exception) -> None:
        for entry in self._current:
            if not entry.future.done():
                entry.future.set_exception(exc)
        self._current = []
        while self._queue:
            entry = self._pop()
            if not entry.future.done():
                entry.future.set_exception(exc)
