"""service.memory hands freed heap pages back: after start-up (release_free_memory, the idle-RSS fix of
issue 10) and once idle after a burst of requests (trim_when_idle)."""

from __future__ import annotations

import asyncio
import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from service import memory

REPO = Path(__file__).resolve().parents[2]
# Freeing a 64 MiB block raises glibc's mmap threshold, so the next 200 MiB of 512 KiB blocks come from
# the heap; freed, they stay mapped (in RSS) until malloc_trim. Run apart: pytest's heap is its own.
SCENARIO = """
import torch
from service.memory import rss_mib, release_free_memory
big = torch.ones(64 << 18); del big
blocks = [torch.ones(1 << 17) for _ in range(400)]
keep = blocks[-1]  # the top of the heap stays in use: free() alone cannot shrink it
del blocks
before = rss_mib()
release_free_memory()
print(before, rss_mib())
"""


NO_GLIBC = platform.system() != "Linux" or ctypes.util.find_library("c") is None


@pytest.mark.skipif(NO_GLIBC, reason="glibc only")
def test_freed_heap_memory_leaves_the_rss() -> None:
    out = subprocess.run([sys.executable, "-c", SCENARIO], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    before, after = map(float, out.stdout.split())
    assert before - after > 100, (before, after)  # most of the 200 MiB freed


class Scripted:
    """The service's side of trim_when_idle, driven by the test: busy or not, batches run so far."""

    def __init__(self) -> None:
        self.busy = False
        self.batches = 0
        self.trims: list[float] = []  # loop time of each trim
        self.returned: list[float] = []

    async def trim(self) -> float:
        self.trims.append(asyncio.get_running_loop().time())
        return 3.5


async def _drive(s: Scripted, steps: list[tuple[float, bool, int]]) -> None:
    """Run the loop (IDLE 0.05 s, at most one trim per 0.3 s) through (seconds, busy, batches) steps."""
    task = asyncio.create_task(memory.trim_when_idle(lambda: s.busy, lambda: s.batches, s.returned.append,
                                                     idle_s=0.05, min_interval_s=0.3, trim_fn=s.trim))
    try:
        for seconds, busy, batches in steps:
            s.busy, s.batches = busy, batches
            await asyncio.sleep(seconds)
    finally:
        task.cancel()


def test_idle_trim_waits_for_work_then_for_quiet() -> None:
    s = Scripted()
    asyncio.run(_drive(s, [
        (0.2, False, 0),  # idle since start, nothing served: nothing to give back
        (0.2, True, 5),  # a burst: never while it runs
        (0.2, False, 5),  # quiet after work: one trim
        (0.2, False, 5),  # still quiet, no new work: no second trim
    ]))
    assert len(s.trims) == 1 and s.returned == [3.5]


def test_idle_trim_runs_at_most_once_per_interval() -> None:
    s = Scripted()
    # a new burst every 0.1 s with quiet gaps between them, for 1.2 s: not a trim per gap
    steps = [(0.05, True, n) if i % 2 == 0 else (0.1, False, n) for n in range(1, 9) for i in range(2)]
    asyncio.run(_drive(s, steps))
    assert 1 <= len(s.trims) <= 5
    assert all(b - a >= 0.3 for a, b in zip(s.trims, s.trims[1:], strict=False))
