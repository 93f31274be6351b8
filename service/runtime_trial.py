"""--runtime auto on a first start: torch serves from ready while the candidate is built and timed.

A start with no kept decision for this checkpoint and machine (runtime_choice.recall) exported,
built and timed onnxruntime before it was ready: 3.8 s of resnet18's 11.2 s first start on the Zen 3
(the export 1.0 s, the comparison 2.2 s, torch's slower thread timing 0.6 s), 1.96x the baseline's
cold start against a target of 1.5x; in Kubernetes, where a pod's checkpoint volume is often
read-only or new, that is every start. Now the service is ready once torch is warm, as under
--runtime torch, and then:

1. the candidate is exported and built on a thread of its own beside serving
   (Predictor.build_deferred_candidate);
2. it is warmed and timed against what torch serves with warm-up's plan (threads.Alternation: the
   lone image and the thread rule's batch, at the counts in use, alternating), one forward pass at a
   time on the inference thread, each started in a gap, when nothing is decoding, queued or running.
   A request that arrives meanwhile waits for at most one pass (resnet18's batch of 8: 0.28 s on
   the Zen 3);
3. the loser is freed between two batches, and the decision is kept for later starts.

A pass during which a request arrived was timed beside traffic, like a reload's: its decision is
served but not kept. Under traffic that leaves no gap, passes run beside it PATIENCE_S after the
trial's first wait began.
GET /v1/model says `runtime_choice.pending: true` until the trial is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from service import runtime_choice
from service.memory import release_memory
from service.predictor import Predictor
from service.threads import LONE_PAIRS, Alternation, at_threads, probe_size

if TYPE_CHECKING:
    from service.state import ServiceState

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_S = 0.005  # how often the trial looks for a gap between requests
PATIENCE_S = 30.0  # the longest wait for a gap before a pass runs beside traffic


class _Gone(Exception):
    """The trial's predictor is no longer served (a reload), or the service is draining."""


def timed_pass(p: Predictor, variant: str, served: str, n: int, threads: int) -> float:
    """One blank batch of n on `variant` at `threads` (inference thread), in seconds; `served` is in
    place again afterwards, for the batches between passes."""
    p.use(variant)
    try:
        start = time.perf_counter()
        at_threads(threads, p.run_blank, n)
        return time.perf_counter() - start
    finally:
        p.use(served)


async def on_own_thread(fn: Callable[[], T]) -> T:
    """fn() on a new daemon thread: the export may take a second or more, and asyncio's default
    executor is shared with the service's other background work."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # the trial was cancelled meanwhile (shutdown)
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # handed to the awaiting task
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="runtime-trial", daemon=True).start()
    return await done


class Trial:
    def __init__(self, state: ServiceState, predictor: Predictor, sizes: list[int]) -> None:
        self.state, self.p = state, predictor
        self.sizes = sizes  # the sizes warm-up ran (all, or the timed ones under --warmup auto)
        self.served = predictor.variant
        self.passes = 0
        self.beside_traffic = 0  # passes during which a request arrived
        self.patience_until: float | None = None

    async def _gap(self) -> None:
        loop = asyncio.get_running_loop()
        if self.patience_until is None:  # one deadline for the whole trial, not one per pass
            self.patience_until = loop.time() + PATIENCE_S
        while True:
            if self.state.draining or self.state.predictor is not self.p:
                raise _Gone
            if not self.state.predicting() or loop.time() >= self.patience_until:
                return
            await asyncio.sleep(POLL_S)

    async def one_pass(self, variant: str, n: int, threads: int) -> float:
        await self._gap()
        took = await self.state.batcher.call_in_worker(timed_pass, self.p, variant, self.served, n, threads)
        self.passes += 1
        self.beside_traffic += self.state.predicting()  # decoding, queued or waiting behind this pass
        return took

    async def fastest(self, cand: str, n: int, threads: int, repeats: int) -> tuple[float, float]:
        plan = Alternation(repeats)
        for side in plan.sides():
            plan.record(side, await self.one_pass((self.served, cand)[side], n, threads))
        return plan.best[0], plan.best[1]

    async def measure(self, cand: str) -> runtime_choice.Measured:
        """Warm the candidate where torch is warm (a lone image at every count the thread tuner may
        use: ONNX Runtime makes a session per count; the batch at the batch count), then time both."""
        tuner = self.state.tuner
        lone, batch, top = tuner.lone, tuner.batch, probe_size(self.sizes)
        for threads in dict.fromkeys((lone, tuner.few, tuner.all)):
            await self.one_pass(cand, 1, threads)
        await self.one_pass(cand, top, batch)
        m = await self._timed(cand, lone, batch, top)
        if runtime_choice.unsure(m):  # close, or the two sizes disagree: a second round first
            log.info("runtime %s; timing a second round", runtime_choice.decide(m).reason)
            m = runtime_choice.merged(m, await self._timed(cand, lone, batch, top))
        return m

    async def _timed(self, cand: str, lone: int, batch: int, top: int) -> runtime_choice.Measured:
        torch_one, cand_one = await self.fastest(cand, 1, lone, LONE_PAIRS)
        torch_top, cand_top = await self.fastest(cand, top, batch, 3)
        return runtime_choice.Measured(cand, self.p.precision, top, torch_top, cand_top, torch_one, cand_one)


async def run(state: ServiceState, sizes: list[int]) -> runtime_choice.Choice | None:
    """Build, time and settle a deferred candidate of the served predictor (after ready); the choice,
    or None when there was nothing to do or the predictor was replaced or the service is stopping."""
    p = state.predictor
    if not p.runtime_pending:
        return None
    start = time.perf_counter()
    if not await on_own_thread(p.build_deferred_candidate):
        return p.runtime_choice  # the candidate could not run: torch serves, the reason says why
    cand = p.runtime_candidate
    assert cand is not None
    trial = Trial(state, p, sizes)
    keep = True
    try:
        choice = runtime_choice.decide(await trial.measure(cand))
    except _Gone:
        log.info("runtime auto: trial ended (the service is stopping, or another model is served)")
        return None
    except Exception as e:  # the candidate failed on a blank batch: torch goes on serving
        log.warning("runtime auto: %s failed while being timed", cand, exc_info=True)
        choice, keep = runtime_choice.Choice("auto", "torch", f"auto: torch, {cand} failed while being timed "
                                             f"({e})"), False
    if trial.beside_traffic:
        keep = False
        why = (f"{choice.reason}; {trial.beside_traffic} of {trial.passes} timed passes ran beside "
               "requests, so it is not kept for later starts")
        choice = dataclasses.replace(choice, reason=why)
    if state.draining or state.predictor is not p:
        log.info("runtime auto: trial ended (the service is stopping, or another model is served)")
        return None
    try:
        await state.batcher.call_in_worker(_settle, p, choice, keep, trial.sizes, state.tuner.batch)
    except Exception as e:  # the winner failed at a size the trial had not run: torch stays
        log.warning("runtime auto: %s failed while being warmed", choice.runtime, exc_info=True)
        choice = runtime_choice.Choice("auto", "torch", f"auto: torch, {choice.runtime} failed while being "
                                       f"warmed ({e})")
        await state.batcher.call_in_worker(p.settle_runtime, choice, False)
    # the loser's weights or session, and what the winner's warm-up left in its pool
    await release_memory(lambda: state.batcher.call_in_worker(p.release_memory), collect=True)
    state.publish_model()
    log.info("runtime %s (%.2fs after ready, %d timed passes)", choice.reason, time.perf_counter() - start,
             trial.passes)
    return choice


def _settle(p: Predictor, choice: runtime_choice.Choice, keep: bool, sizes: list[int], batch: int) -> None:
    """Inference thread, between two batches: warm the winner at the sizes warm-up ran that the trial
    did not (none under --warmup auto on the eager CPU), while torch is still there to fall back on;
    then keep the winner only."""
    if choice.runtime != "torch":
        top = probe_size(sizes)
        for n in sizes:
            if n not in (1, top):
                timed_pass(p, choice.runtime, p.variant, n, batch)
    p.settle_runtime(choice, keep=keep)
