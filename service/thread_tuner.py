"""The torch thread counts, re-checked on real traffic after warm-up chose them.

Warm-up times each count for a few hundred milliseconds (service/threads.py). Whatever else the
machine does in those moments decides the choice for the whole life of the process: on the 2-core
AMD EPYC a service's warm-up once read resnet18's batch of 8 as 180 ms on 2 threads against 191 ms
on 1 (the model takes ~100 vs ~190) and ran every batch on one core: 42 req/s at 16 clients where
the next start, on both cores, made 55. So the inference thread re-checks now and then: a window of
WINDOW batches that alternate the other count and the current one, each side's fastest per-image
time compared with the same rule as warm-up (all cores only below BATCH_MARGIN of the others' time
for batches, LONE_MARGIN for lone images). Real batches include what decoding beside them costs,
which warm-up cannot see. A re-check that keeps the choice doubles the interval to the next (up to
EVERY_MAX), so once the choice holds the cost is a few slower batches in a thousand (with the first
re-check after 16 batches instead of 64, a 3-round A/B of short runs, 40 batches each, read 61.6 vs
65.1 req/s for the version without re-checks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from service.threads import BATCH_MARGIN, LONE_MARGIN

log = logging.getLogger(__name__)
EVERY_FIRST = 64  # batches of a kind before the first re-check (~5 s of resnet18 at 16 clients)
EVERY_MAX = 2048  # the longest interval between re-checks
WINDOW = 4  # batches per re-check: other, current, other, current


def size_range(n: int) -> int:
    """Batch sizes compared with each other: the same power-of-two range (per-image time depends on
    the batch size, little within such a range)."""
    return n.bit_length()


@dataclass
class _Kind:
    """Lone images or batches: the count in use and the re-check in progress."""

    name: str
    current: int
    margin: float
    every: int = EVERY_FIRST
    countdown: int = EVERY_FIRST
    checking: bool = False
    window: list[tuple[int, int, float]] = field(default_factory=list)  # (threads, size, s per image)


class ThreadTuner:
    def __init__(self, few: int, every_core: int, batch: int, lone: int, enabled: bool = True) -> None:
        self.few, self.all = few, every_core
        # pinned (--torch-threads) or one core: nothing to choose; on a GPU the CPU threads do not matter
        self.enabled = enabled and few != every_core and {batch, lone} <= {few, every_core}
        self.kinds = {False: _Kind("batches", batch, BATCH_MARGIN),
                      True: _Kind("lone images", lone, LONE_MARGIN)}

    def restart(self) -> None:
        """A new model (reload): re-check soon, not after the old model's long interval."""
        for kind in self.kinds.values():
            kind.every = kind.countdown = EVERY_FIRST
            kind.checking, kind.window = False, []

    @property
    def batch(self) -> int:
        return self.kinds[False].current

    @property
    def lone(self) -> int:
        return self.kinds[True].current

    def threads_for(self, lone: bool) -> int:
        """The count for the next batch (called on the inference thread only)."""
        kind = self.kinds[lone]
        if not self.enabled:
            return kind.current
        if not kind.checking:
            kind.countdown -= 1
            if kind.countdown > 0:
                return kind.current
            kind.checking = True
        return self._other(kind) if len(kind.window) % 2 == 0 else kind.current  # other, current, ...

    def observe(self, lone: bool, threads: int, images: int, seconds: float) -> None:
        """A batch of `images` ran at `threads` in `seconds` (after threads_for said so)."""
        kind = self.kinds[lone]
        if not kind.checking:
            return
        kind.window.append((threads, images, seconds / images))
        if len(kind.window) < WINDOW:
            return
        window, kind.window, kind.checking = kind.window, [], False
        if len({size_range(n) for _, n, _ in window}) > 1:  # sizes too different to compare: later
            kind.countdown = kind.every
            return
        best = {t: min(s for tt, _, s in window if tt == t) for t, _, _ in window}
        if len(best) < 2:  # a reload's restart() cleared the window halfway (event-loop thread)
            kind.countdown = kind.every
            return
        choice = self.all if best[self.all] < kind.margin * best[self.few] else self.few
        if choice == kind.current:
            kind.every = min(2 * kind.every, EVERY_MAX)
        else:
            log.info("thread re-check, %s of %d: %.2f ms/image on %d thread(s), %.2f on %d -> %d (was %d)",
                     kind.name, window[0][1], best[self.all] * 1e3, self.all, best[self.few] * 1e3,
                     self.few, choice, kind.current)
            kind.current, kind.every = choice, EVERY_FIRST
        kind.countdown = kind.every

    def _other(self, kind: _Kind) -> int:
        return self.few if kind.current == self.all else self.all
