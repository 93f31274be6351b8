"""A first start's --runtime auto trial (service/runtime_trial.py): torch serves from ready while
onnxruntime is built and timed in the gaps between requests.

The trial itself runs for real (a real Predictor, real export, real timing) against a scripted
stand-in for the service state, its neighbour: what "a request is in flight" says at each moment is
what the tests choose. The live tests check what a user sees: answers during the trial, the choice
reported once it is over, a clean stop in the middle of it.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service import runtime_trial
from service.predictor import Predictor
from service.runtimes.base import FP32_TOLERANCE
from tests import images
from tests.conftest import run_server
from tests.service.test_runtime_auto import needs_ort, settled

CPU = torch.device("cpu")
SIZES = [1, 2, 4]


class ScriptedState:
    """The parts of ServiceState the trial uses. `busy(call)` answers predicting() for its n-th call
    (1-based): the trial asks before each pass (waiting for a gap) and after it (did a request
    arrive meanwhile?). The inference thread is this one: call_in_worker runs the function inline."""

    def __init__(self, predictor: Predictor, busy: Callable[[int, ScriptedState], bool]) -> None:
        self.predictor, self.busy, self.calls = predictor, busy, 0
        self.draining = False
        self.batcher = self
        self.tuner = SimpleNamespace(few=1, all=1, batch=1, lone=1)
        self.published = 0

    def predicting(self) -> bool:
        self.calls += 1
        return self.busy(self.calls, self)

    async def call_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def publish_model(self) -> None:
        self.published += 1


def first_start(tiny_checkpoint: Path, tmp_path: Path) -> Predictor:
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    p = Predictor.load(ckpt, CPU, runtime="auto", max_batch_size=4, defer_candidate=True)
    assert p.runtime.name == "torch" and p.runtime_pending and p.runtime_candidate is None
    assert not list(tmp_path.glob("*.onnx"))  # nothing exported before ready
    return p


def trial(state: ScriptedState) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return asyncio.run(runtime_trial.run(state, SIZES))  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(before)


@needs_ort
def test_it_waits_for_gaps_and_keeps_a_quiet_decision(tiny_checkpoint: Path, tmp_path: Path) -> None:
    p = first_start(tiny_checkpoint, tmp_path)
    state = ScriptedState(p, lambda n, s: n <= 5)  # requests in flight at the first five looks
    choice = trial(state)
    assert choice is not None and not choice.pending and choice.runtime in ("torch", "onnxruntime")
    assert choice.measured is not None and choice.measured.batch == 4
    assert "not kept" not in choice.reason
    assert p.runtime.name == choice.runtime and list(p._runtimes) == [p.variant] and not p.runtime_pending
    assert (tmp_path / "m.safetensors.onnxruntime.onnx").is_file()
    assert (tmp_path / "m.safetensors.runtime-choice.json").is_file()
    assert state.published == 1
    again = Predictor.load(tmp_path / "m.safetensors", CPU, runtime="auto", max_batch_size=4,
                           defer_candidate=True)
    assert not again.runtime_pending and again.runtime.name == choice.runtime


@needs_ort
def test_a_pass_beside_a_request_is_not_kept(tiny_checkpoint: Path, tmp_path: Path) -> None:
    p = first_start(tiny_checkpoint, tmp_path)
    choice = trial(ScriptedState(p, lambda n, s: n == 6))  # after the third pass: a request came
    assert choice is not None and p.runtime.name == choice.runtime
    assert "; 1 of " in choice.reason and "ran beside requests, so it is not kept" in choice.reason
    assert not (tmp_path / "m.safetensors.runtime-choice.json").exists()
    assert p.describe()["runtime_choice"]["reason"] == choice.reason


@needs_ort
def test_a_reload_during_the_trial_ends_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    p = first_start(tiny_checkpoint, tmp_path)

    def reload_at_the_third_look(n: int, s: ScriptedState) -> bool:
        if n == 3:
            s.predictor = SimpleNamespace()  # type: ignore[assignment]  # another model is served now
        return False

    assert trial(ScriptedState(p, reload_at_the_third_look)) is None
    assert p.runtime_candidate == "onnxruntime" and p.runtime.name == "torch"  # left alone, retiring
    assert not (tmp_path / "m.safetensors.runtime-choice.json").exists()


@needs_ort
def test_a_candidate_that_fails_while_timed_leaves_torch(tiny_checkpoint: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    p = first_start(tiny_checkpoint, tmp_path)
    real = p.run_blank

    def fails_on_onnxruntime(n: int) -> None:
        if p.runtime.name == "onnxruntime":
            raise RuntimeError("session exploded")
        real(n)

    monkeypatch.setattr(p, "run_blank", fails_on_onnxruntime)
    choice = trial(ScriptedState(p, lambda n, s: False))
    assert choice is not None and choice.runtime == "torch" and p.runtime.name == "torch"
    assert choice.reason == "auto: torch, onnxruntime failed while being timed (session exploded)"
    assert list(p._runtimes) == ["fp32"]
    assert not (tmp_path / "m.safetensors.runtime-choice.json").exists()


@needs_ort
def test_requests_during_the_trial_are_answered_by_one_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Live: requests from the moment of ready, while the trial builds and times beside them; each
    answer is torch's or onnxruntime's (equal within the fp32 tolerance), and the kept file is there
    exactly when the reason says so."""
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    blob = images.photo_jpeg((96, 80), seed=3)
    (tmp_path / "torch").mkdir()
    with run_server(ckpt, tmp_path / "torch", runtime="torch") as server:
        want = server.client.post("/v1/predict", content=blob, params={"probabilities": "all"}).json()
    with run_server(ckpt, tmp_path, runtime="auto", max_batch_size=4) as server:
        answers = []
        while server.client.get("/v1/model").json()["runtime_choice"]["pending"] and len(answers) < 400:
            answers.append(server.client.post("/v1/predict", content=blob, params={"probabilities": "all"}))
        info = settled(server)
        answers.append(server.client.post("/v1/predict", content=blob, params={"probabilities": "all"}))
    assert answers and all(a.status_code == 200 for a in answers)
    for a in answers:
        diff = max(abs(x - y) for x, y in zip(a.json()["probabilities"], want["probabilities"], strict=True))
        assert diff <= FP32_TOLERANCE
    kept = (tmp_path / "m.safetensors.runtime-choice.json").is_file()
    assert kept == ("not kept" not in info["runtime_choice"]["reason"])
    assert info["runtime"]["name"] == info["runtime_choice"]["runtime"]


@needs_ort
def test_sigterm_during_the_trial_stops_cleanly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    with run_server(ckpt, tmp_path, cli=True, runtime="auto", max_batch_size=4) as server:
        server.proc.send_signal(signal.SIGTERM)  # right after ready: the trial has just begun
        end = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        log = server.log_text()
    assert server.proc.returncode == 0, log  # python -m service: 0 after a drain
    assert "building it now, timing it between requests" in log
    assert "stopped: batcher drained" in log and "Traceback" not in log
