"""Give freed heap memory back to the operating system after start-up and reloads.

Loading reads the checkpoint into one buffer, batch-norm folding builds a second copy of the model,
and warm-up runs the largest batch; all of it is freed before the service is ready, but glibc keeps
freed heap pages mapped (its mmap threshold grows after large frees, so later large blocks come from
the heap too), so the idle process still counted them in its RSS. `malloc_trim(0)` returns them.
A no-op where the C library is not glibc.

The same holds after a burst of requests: torch's CPU allocator frees a batch's activations, but
glibc keeps the freed pages in each thread's arena, and ONNX Runtime keeps them in its own arena
(service/runtimes/onnxruntime.py) until asked to shrink it. `trim_when_idle` gives both back once the
service has been idle for a moment, at most every MIN_INTERVAL_S: `release_memory` asks the served
runtime first (on the inference thread), then trims the heap.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

IDLE_S = 1.0  # no prediction decoding, queued or running for this long: the burst is over
MIN_INTERVAL_S = 10.0  # malloc_trim walks every arena under its lock: not on every short pause
POLL_S = 0.25


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl and others: nothing to do
        return None


def trim() -> float:
    """Return free heap pages to the OS (glibc only); the RSS it gave back, MiB (0 elsewhere)."""
    fn = _malloc_trim()
    if fn is None:
        return 0.0
    before = rss_mib()
    fn(0)
    return max(0.0, before - rss_mib())


def release_free_memory() -> float:
    """Collect garbage, then return free heap pages to the OS (glibc only); logs the RSS change and
    returns it, MiB."""
    gc.collect()
    if _malloc_trim() is None:
        return 0.0
    before = rss_mib()
    trim()
    log.info("returned freed memory to the OS: RSS %.0f -> %.0f MiB", before, rss_mib())
    return max(0.0, before - rss_mib())


async def release_memory(runtime_release: Callable[[], Awaitable[object]], collect: bool = False) -> float:
    """`runtime_release` first (the served runtime's own pool, run on the inference thread between two
    batches), then the heap's free pages (after a garbage collection with `collect`); the RSS given
    back, MiB."""
    before = rss_mib()
    await runtime_release()
    await asyncio.to_thread(release_free_memory if collect else trim)
    return max(0.0, before - rss_mib())


async def trim_when_idle(
    busy: Callable[[], bool], work_done: Callable[[], int], returned: Callable[[float], None],
    idle_s: float = IDLE_S, min_interval_s: float = MIN_INTERVAL_S,
    trim_fn: Callable[[], Awaitable[float]] | None = None,
) -> None:
    """Run until cancelled (event loop): once predictions have run (`work_done` changed) and then
    none has been in flight (`busy`) for `idle_s`, trim the heap on a worker thread, at most once
    every `min_interval_s`; `returned(MiB)` is told what each trim gave back."""
    loop = asyncio.get_running_loop()
    run = trim_fn or (lambda: asyncio.to_thread(trim))
    seen, last, quiet_since = work_done(), float("-inf"), None
    while True:
        await asyncio.sleep(POLL_S if idle_s > POLL_S else idle_s / 2)
        now = loop.time()
        if busy():
            quiet_since = None
            continue
        quiet_since = now if quiet_since is None else quiet_since
        if work_done() == seen or now - quiet_since < idle_s or now - last < min_interval_s:
            continue
        seen, last = work_done(), now
        mib = await run()
        returned(mib)
        log.debug("idle: returned %.1f MiB of freed heap to the OS", mib)
