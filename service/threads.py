"""Torch thread counts for a batch and for a lone image, chosen by timing the model at start-up.

Neither count is right for every model on every machine (docs/benchmarks.md): on 2 cores resnet18's
batch of 16 took 0.55x as long on 2 threads as on 1 (Intel), mobilenet_v3_small's 0.99x, and on an AMD
EPYC Zen 4 resnet18's lone image 0.91x. So warm-up times both counts and keeps what it measured.

- A lone image (a batch of one with nothing queued) takes every core whenever that is measurably
  faster (below LONE_MARGIN of the cores-1 time: the margin only absorbs timing noise), because the
  decode threads are idle then: a core left to them would sit unused. The rule this replaces asked
  for 0.9x, and so kept a lone request on one thread at 48.8 vs 53.7 ms (0.91x) on the AMD machine.
- A batch takes every core only when that is clearly faster (below BATCH_MARGIN): batches form when
  requests queue, that is when the decode threads are busy too, and a batch on every core takes its
  last core from them; below 0.75x the model's gain outweighs the decode time it displaces on 2 cores
  (measured: resnet18 at 0.55x gains 1.6x at 16 clients; mobilenet at 0.99x loses when it takes it).

The timing is cheap by construction: every batch size is warmed once at cores-1 (the default), the
all-cores count is tried on the lone image and on one batch (the largest warmed size up to
PROBE_MAX, at half the start-up cost of 16; assumed, not yet re-measured on a quiet machine: 8
images keep every thread of a 2-16 core machine as busy as 16 do), and the remaining sizes are
warmed at all cores only when batches will use them.

Each comparison alternates the two thread counts run by run and keeps each one's fastest
(interference only ever adds time), at least MIN_PAIRS pairs even past the budget. Timing one count
after the other let a burst of interference land on one side only: on the AMD machine resnet18's
batch of 8 once read 230 ms on 2 threads against 216 ms on 1 (it takes 100 vs 190), and that
service ran every batch on one core for its whole life.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from service import precision, runtime_choice
from service.predictor import Predictor, WarmupStopped

log = logging.getLogger(__name__)
LONE_MARGIN = 0.97
BATCH_MARGIN = 0.75
PROBE_MAX = 8  # the batch timed for the batch rule: the largest warmed size up to this
TIMING_BUDGET_S = 0.3  # per timed (size, setting): repeat until this much time is spent, max 3
MIN_PAIRS = 2  # alternating comparisons: at least this many runs of each side, whatever the budget
LONE_PAIRS = 5  # a lone image is cheap to time: more pairs, within 2 x TIMING_BUDGET_S


def warm_sizes(predictor: Runnable, sizes: list[int], stop: threading.Event | None) -> None:
    """Each size once at the current thread count, leaving the trace/compile buckets alone."""
    for n in sizes:
        if stop is not None and stop.is_set():
            raise WarmupStopped("warm-up stopped: the service is shutting down")
        predictor.run_blank(n)


class Runnable(Protocol):
    def run_blank(self, n: int) -> None: ...
    def warmup(self, sizes: list[int], stop: threading.Event | None = None) -> float: ...


class Alternation:
    """The plan of an alternating comparison: a, b, a, b, ... at least `min_pairs` pairs and up to
    `repeats` within `budget_s` of time spent; `best` is each side's fastest run. A plan apart from
    who runs it: warm-up times on the inference thread in one go (fastest_alternating), a first
    start's runtime trial one run at a time, in the gaps between requests (service/runtime_trial.py)."""

    def __init__(self, repeats: int = 3, budget_s: float = 2 * TIMING_BUDGET_S,
                 min_pairs: int = MIN_PAIRS) -> None:
        self.repeats, self.budget_s, self.min_pairs = repeats, budget_s, min_pairs
        self.best = [float("inf"), float("inf")]
        self.spent = 0.0

    def sides(self) -> Iterator[int]:
        """0 (a) or 1 (b), the next side to run; record() each run's time before asking again."""
        for i in range(max(self.repeats, self.min_pairs)):
            yield 0
            yield 1
            if i + 1 >= self.min_pairs and self.spent >= self.budget_s:
                return

    def record(self, side: int, took: float) -> None:
        self.best[side] = min(self.best[side], took)
        self.spent += took


def fastest_alternating(
    run_a: Callable[[], object], run_b: Callable[[], object], repeats: int = 3,
    budget_s: float = 2 * TIMING_BUDGET_S, min_pairs: int = MIN_PAIRS,
) -> tuple[float, float]:
    """Fastest run of a and of b, the two alternating run by run (drift or a burst of interference
    lands on both), at least `min_pairs` pairs and up to `repeats` within `budget_s`."""
    plan = Alternation(repeats, budget_s, min_pairs)
    for side in plan.sides():
        start = time.perf_counter()
        (run_a, run_b)[side]()
        plan.record(side, time.perf_counter() - start)
    return plan.best[0], plan.best[1]


def at_threads(threads: int, fn, *args):  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class ThreadChoice:
    batch: int  # threads for a batch
    lone: int  # threads for a lone image
    took_s: float
    top: int  # the batch size timed for the batch rule


def probe_size(sizes: list[int]) -> int:
    return max([n for n in sizes if n <= PROBE_MAX] or [min(sizes)])


def choose(
    predictor: Runnable, sizes: list[int], all_threads: int, stop: threading.Event | None = None,
    timed_only: bool = False,
) -> ThreadChoice:
    """Threads for a batch and for a lone image, and the times they were chosen by. Starts on the
    current (batch default) thread count and leaves torch on it. `timed_only`: warm only the sizes the
    timing runs (1 and the probe batch), where warming the others would cost more than it saves
    (eager CPU)."""
    few = torch.get_num_threads()
    start = time.perf_counter()
    top = probe_size(sizes)
    predictor.warmup(sorted({1, top}) if timed_only else sizes, stop)
    if all_threads == few:  # pinned with --torch-threads, or a single core
        return ThreadChoice(few, few, time.perf_counter() - start, top)
    at_threads(all_threads, warm_sizes, predictor, sorted({1, top}), stop)  # kernels for that count first

    def blank(threads: int, n: int) -> Callable[[], object]:
        return lambda: at_threads(threads, predictor.run_blank, n)

    narrow_one, wide_one = fastest_alternating(blank(few, 1), blank(all_threads, 1), LONE_PAIRS)
    narrow_top, wide_top = fastest_alternating(blank(few, top), blank(all_threads, top))
    lone = all_threads if wide_one < LONE_MARGIN * narrow_one else few
    batch = all_threads if wide_top < BATCH_MARGIN * narrow_top else few
    rest = [n for n in sizes if n not in (1, top)]
    if batch == all_threads and rest and not timed_only:
        at_threads(all_threads, warm_sizes, predictor, rest, stop)
    log.info(
        "batch of %d: %.1f ms on %d thread(s), %.1f ms on %d -> %d; lone image: %.2f ms vs %.2f ms -> %d",
        top, wide_top * 1e3, all_threads, narrow_top * 1e3, few, batch,
        wide_one * 1e3, narrow_one * 1e3, lone,
    )
    return ThreadChoice(batch, lone, time.perf_counter() - start, top)


def fastest_pair(predictor: Predictor, n: int, a: str, b: str) -> tuple[float, float]:
    """Fastest blank batch of n at precision a and at b, alternating (fastest_alternating)."""

    def blank(name: str) -> Callable[[], object]:
        def run() -> None:
            predictor.use(name)
            predictor.run_blank(n)

        return run

    return fastest_alternating(blank(a), blank(b))


def settle_precision(
    predictor: Predictor, sizes: list[int], batch_threads: int, lone_threads: int,
    stop: threading.Event | None = None, fp32_warm: bool = False,
) -> precision.Choice:
    """--precision auto (service/precision.py): probe agreement first (cheap to fail), then fp32 and
    the candidate timed alternately on a lone image at `lone_threads` and on one batch (the thread
    rule's, largest warmed size up to 8) at `batch_threads`. fp32's times from the thread choice are
    not reused: taken seconds earlier, they would carry a shared machine's drift into the ratio.
    Leaves only the winner in the predictor, warmed at every size at both counts; returns the choice.
    `fp32_warm`: start-up's thread choice has already warmed fp32 at both counts."""
    low = predictor.candidate
    assert low is not None
    start = time.perf_counter()
    top = probe_size(sizes)
    images = precision.probe_images(predictor.input_shape)
    want = at_threads(batch_threads, predictor.top1, images, "fp32")
    got = at_threads(batch_threads, predictor.top1, images, low)
    agreed = int((want == got).sum())
    if agreed < precision.AGREEMENT_BAR * len(images):
        choice = precision.Choice("auto", "fp32", f"auto: fp32, {low} top-1 agreed {agreed}/{len(images)} "
                                  "on the probe images (needs all)")
    else:
        for name in (low,) if fp32_warm else ("fp32", low):  # kernels at both counts before timing
            predictor.use(name)
            at_threads(lone_threads, warm_sizes, predictor, [1], stop)
            at_threads(batch_threads, warm_sizes, predictor, [top], stop)
        fp32_one, low_one = at_threads(lone_threads, fastest_pair, predictor, 1, "fp32", low)
        fp32_top, low_top = at_threads(batch_threads, fastest_pair, predictor, top, "fp32", low)
        choice = precision.decide(precision.Measured(low, top, fp32_top, low_top, fp32_one, low_one,
                                                     agreed, len(images)))
    predictor.settle(choice)
    if choice.precision != "fp32":  # fp32 was warm at every size; the winner is at 1 and `top` so far
        at_threads(batch_threads, predictor.warmup, [n for n in sizes if n != top], stop)
        if predictor.compile != "off":  # the buckets are every warmed size, as predictor.warmup sets them
            predictor.buckets = sorted(set(sizes))
    log.info("precision %s (%.2fs to decide)", choice.reason, time.perf_counter() - start)
    return choice


def settle_runtime(
    predictor: Predictor, sizes: list[int], batch_threads: int, lone_threads: int,
    stop: threading.Event | None = None, every_count: tuple[int, ...] = (), served_warm: bool = True,
    keep: bool = True,
) -> runtime_choice.Choice:
    """--runtime auto (service/runtime_choice.py): what torch serves now (after --precision auto has
    settled) and the candidate timed alternately on a lone image at `lone_threads` and on one batch
    (the thread rule's) at `batch_threads`, as settle_precision does. Leaves only the winner in the
    predictor. The candidate is warmed at the sizes torch was warmed at, and at each of
    `every_count` on a lone image: ONNX Runtime makes a session per thread count, and the thread
    tuner will try the other count on live batches. `served_warm`: start-up's thread choice has
    warmed torch at both counts (a reload's has not); `keep`: the decision is kept for later starts
    (not a reload's, timed beside live traffic)."""
    cand = predictor.runtime_candidate
    assert cand is not None
    start = time.perf_counter()
    served, served_precision = predictor.variant, predictor.precision
    top = probe_size(sizes)
    for name in (cand,) if served_warm else (served, cand):  # both warm before either is timed
        predictor.use(name)
        for n in dict.fromkeys((lone_threads, *every_count)) if name == cand else (lone_threads,):
            at_threads(n, warm_sizes, predictor, [1], stop)
        at_threads(batch_threads, warm_sizes, predictor, [top], stop)
    def timed() -> runtime_choice.Measured:
        torch_one, cand_one = at_threads(lone_threads, fastest_pair, predictor, 1, served, cand)
        torch_top, cand_top = at_threads(batch_threads, fastest_pair, predictor, top, served, cand)
        return runtime_choice.Measured(cand, served_precision, top, torch_top, cand_top, torch_one, cand_one)

    measured = timed()
    if runtime_choice.unsure(measured):  # close, or the two sizes disagree: a second round first
        log.info("runtime %s; timing a second round", runtime_choice.decide(measured).reason)
        measured = runtime_choice.merged(measured, timed())
    choice = runtime_choice.decide(measured)
    predictor.settle_runtime(choice, keep=keep)
    if choice.runtime == cand:
        at_threads(batch_threads, warm_sizes, predictor, [n for n in sizes if n not in (1, top)], stop)
    log.info("runtime %s (%.2fs to decide)", choice.reason, time.perf_counter() - start)
    return choice
