"""Give freed heap memory back to the operating system after start-up and reloads.

Loading reads the checkpoint into one buffer, batch-norm folding builds a second copy of the model,
and warm-up runs the largest batch; all of it is freed before the service is ready, but glibc keeps
freed heap pages mapped (its mmap threshold grows after large frees, so later large blocks come from
the heap too), so the idle process still counted them in its RSS. `malloc_trim(0)` returns them.
A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_free_memory() -> None:
    """Collect garbage, then return free heap pages to the OS (glibc only); logs the RSS change."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl and others: nothing to do
        return
    before = _rss_mib()
    trim(0)
    log.info("returned freed memory to the OS: RSS %.0f -> %.0f MiB", before, _rss_mib())
