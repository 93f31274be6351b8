"""service.thread_tuner: warm-up's thread counts re-checked on real batches.

The unit under test is the decision; its neighbour, the model, is a cost table: a batch of n at t
threads takes cost[t] * n seconds (per-image cost by thread count), fed in as the inference thread
would feed it.
"""

from __future__ import annotations

import logging

import pytest

from service import thread_tuner
from service.thread_tuner import ThreadTuner


def drive(
    tuner: ThreadTuner, cost: dict[int, float], batches: int, size: int = 8, lone: bool = False
) -> list[int]:
    """Run `batches` batches through the tuner; returns the thread count each one ran at."""
    used = []
    for _ in range(batches):
        t = tuner.threads_for(lone)
        used.append(t)
        tuner.observe(lone, t, 1 if lone else size, cost[t] * (1 if lone else size))
    return used


def test_a_wrong_warm_up_choice_is_corrected_on_real_batches(caplog: pytest.LogCaptureFixture) -> None:
    # warm-up read 180 vs 191 ms and chose 1 thread; real batches take 100 vs 190 ms
    tuner = ThreadTuner(few=1, every_core=2, batch=1, lone=2)
    with caplog.at_level(logging.INFO, "service.thread_tuner"):
        used = drive(tuner, {1: 0.190 / 8, 2: 0.100 / 8}, thread_tuner.EVERY_FIRST + thread_tuner.WINDOW)
    assert tuner.batch == 2
    assert used[: thread_tuner.EVERY_FIRST - 1] == [1] * (thread_tuner.EVERY_FIRST - 1)  # until the re-check
    assert "batches of 8: 12.50 ms/image on 2 thread(s), 23.75 on 1 -> 2 (was 1)" in caplog.text
    assert tuner.lone == 2  # lone images are their own kind: untouched by batches


def test_a_right_choice_holds_and_is_rechecked_ever_less_often() -> None:
    tuner = ThreadTuner(few=1, every_core=2, batch=2, lone=2)
    used = drive(tuner, {1: 0.190 / 8, 2: 0.100 / 8}, 5000)
    assert tuner.batch == 2
    other = used.count(1)  # two batches per re-check at the other count
    # intervals 64, 128, ..., 2048: re-checks after batch 64, 192, 448, 960, 1984 and 4032 (+4 each)
    assert other == 2 * 6
    assert other / len(used) < 0.003


def test_the_batch_margin_applies_as_at_warm_up() -> None:
    # every core 0.8x the time: not below 0.75x (decoding loses a core to the batch) -> keeps 1
    tuner = ThreadTuner(few=1, every_core=2, batch=2, lone=2)
    drive(tuner, {1: 0.010, 2: 0.008}, thread_tuner.EVERY_FIRST + thread_tuner.WINDOW)
    assert tuner.batch == 1
    # lone images: below 0.97x suffices
    drive(tuner, {1: 0.010, 2: 0.009}, thread_tuner.EVERY_FIRST + thread_tuner.WINDOW, lone=True)
    assert tuner.lone == 2


def test_a_window_of_very_different_batch_sizes_decides_nothing() -> None:
    tuner = ThreadTuner(few=1, every_core=2, batch=1, lone=1)
    for _ in range(thread_tuner.EVERY_FIRST - 1):
        tuner.observe(False, tuner.threads_for(False), 8, 0.19)
    sizes = [2, 16, 2, 16]  # other, current, other, current: per-image times not comparable
    for n in sizes:
        t = tuner.threads_for(False)
        tuner.observe(False, t, n, {1: 0.024, 2: 0.012}[t] * n)
    assert tuner.batch == 1
    assert tuner.kinds[False].every == thread_tuner.EVERY_FIRST  # re-checked again as soon as before


@pytest.mark.parametrize(("few", "every_core", "enabled"), [(2, 2, True), (1, 2, False)])
def test_pinned_threads_or_a_gpu_are_never_rechecked(few: int, every_core: int, enabled: bool) -> None:
    tuner = ThreadTuner(few=few, every_core=every_core, batch=few, lone=few, enabled=enabled)
    assert set(drive(tuner, {1: 0.5, 2: 0.001}, 200)) == {few}


def test_a_reload_rechecks_soon() -> None:
    tuner = ThreadTuner(few=1, every_core=2, batch=2, lone=2)
    drive(tuner, {1: 0.02, 2: 0.01}, 3000)
    assert tuner.kinds[False].every > thread_tuner.EVERY_FIRST
    tuner.restart()
    used = drive(tuner, {1: 0.02, 2: 0.01}, thread_tuner.EVERY_FIRST + thread_tuner.WINDOW)
    assert 1 in used


def test_a_window_of_one_count_only_decides_nothing() -> None:
    """restart() runs on the event loop while the inference thread may be inside a window; a window
    left holding one count must not fail the batch that completes it."""
    tuner = ThreadTuner(few=1, every_core=2, batch=1, lone=1)
    kind = tuner.kinds[False]
    kind.checking = True
    for _ in range(thread_tuner.WINDOW):
        tuner.observe(False, 1, 8, 0.1)
    assert tuner.batch == 1 and not kind.checking
