"""The CUDA path's decisions, tested on a CPU: the CUDA neighbours (device capability, memory queries,
streams) are faked with monkeypatch; the unit under test is ours. The same paths on a real GPU are in
tests/cuda/ (run there by scripts/gpu-check.sh)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import service.predictor
import service.state
from model.checkpoint import load_checkpoint
from service.app import create_app
from service.device_health import device_failure
from service.metrics import Metrics
from service.predictor import PrecisionError, Predictor, check_precision
from service.settings import load_settings
from service.state import ServiceState, build_predictor, side_stream, warm_up
from tests.service.helpers import ready_client

CUDA1 = torch.device("cuda", 1)


# ---- 1. which failures prove the device gone ------------------------------------------------------
def _probe_fails(device: torch.device) -> None:
    raise RuntimeError("CUDA error: unspecified launch failure")


def test_only_device_errors_or_a_failed_probe_fail_the_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert device_failure(sticky, gpu, check=lambda d: None) is not None
    assert device_failure(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), gpu) is not None
    assert device_failure(RuntimeError("shape mismatch"), cpu) is None  # a CPU batch's own bug
    assert device_failure(RuntimeError("shape mismatch"), gpu, check=lambda d: None) is None
    # any exception on CUDA is followed by a probe; a probe that fails proves the device gone
    reason = device_failure(ValueError("odd"), gpu, check=_probe_fails)
    assert reason is not None and "probe on cuda:0" in reason
    # an out-of-memory is usually transient: only a failed probe afterwards fails the device
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert device_failure(oom, gpu, check=lambda d: None) is None
    assert device_failure(oom, gpu, check=_probe_fails) is not None
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None:
        assert device_failure(accelerator_error("unknown error"), gpu, check=lambda d: None) is not None


# ---- 2. /metrics never fails because a GPU read does ----------------------------------------------
def test_gpu_collector_survives_a_failing_read(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []

    def mem_get_info(dev: torch.device) -> tuple[int, int]:
        raise RuntimeError("CUDA error: unknown error")

    def allocated(dev: torch.device) -> int:
        asked.append(dev)
        return 123_000

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 456_000)
    m = Metrics()
    m.watch_gpus([CUDA1])
    text = m.render().decode()  # raised before: the whole scrape failed
    assert 'convserve_gpu_memory_allocated_bytes{device="cuda:1"} 123000.0' in text
    assert 'convserve_gpu_memory_reserved_bytes{device="cuda:1"} 456000.0' in text
    assert 'convserve_gpu_memory_used_bytes{device="cuda:1"}' not in text  # what failed is left out
    assert 'convserve_gpu_metrics_errors_total{device="cuda:1"} 1.0' in text
    assert "convserve_ready" in text  # every other series is still there
    assert asked == [CUDA1]  # the serving device, not the current one


# ---- 3. bf16 is asked of the serving device, natively ---------------------------------------------
def test_bf16_check_asks_the_serving_device_and_refuses_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []
    capability = {0: (8, 0), 1: (7, 5)}  # cuda:0 an A100, cuda:1 a T4 (bf16 only emulated)

    def get_capability(dev: torch.device) -> tuple[int, int]:
        asked.append(dev)
        return capability[dev.index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev: "Tesla T4")
    # what the old check asked: the current device (cuda:0 here), counting emulation as support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(PrecisionError, match=r"bf16 is not supported natively by Tesla T4 on cuda:1.*7\.5"):
        check_precision(CUDA1, "bf16")
    assert asked == [CUDA1]
    check_precision(torch.device("cuda", 0), "bf16")  # Ampere: native
    check_precision(CUDA1, "fp16")  # only bf16 needs the check
    check_precision(torch.device("cpu"), "bf16")
    loaded = load_checkpoint(_TINY[0])
    with pytest.raises(PrecisionError):  # refused before anything touches the device
        Predictor(loaded, CUDA1, precision="bf16")


_TINY: list[Path] = []


@pytest.fixture(autouse=True)
def _remember_tiny(tiny_checkpoint: Path) -> None:
    _TINY[:] = [tiny_checkpoint]


def test_reload_at_an_unsupported_precision_has_its_own_code(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(load_settings(checkpoint=tiny_checkpoint, torch_threads=1, warmup="max",
                                   admin_api_key="k"))
    with ready_client(app) as c:
        def refuse(device: torch.device, precision: str) -> None:
            raise PrecisionError("precision bf16 is not supported natively by Tesla T4 on cuda:0")

        monkeypatch.setattr(service.predictor, "check_precision", refuse)
        r = c.post("/v1/model/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "unsupported_precision"  # was invalid_checkpoint
        assert "Tesla T4" in r.json()["error"]["message"]
        assert c.get("/readyz").status_code == 200  # the old model keeps serving


# ---- 4. TF32 decided explicitly, reported ---------------------------------------------------------
@pytest.fixture
def tf32_flags() -> Any:
    """Restore torch's process-wide TF32 flags afterwards (monkeypatch cannot: they are properties)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_set_at_start_up_and_reported(tiny_checkpoint: Path, tf32_flags: None, tf32: bool) -> None:
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default: TF32 convolutions for "fp32"
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    app = create_app(load_settings(checkpoint=tiny_checkpoint, torch_threads=1, warmup="max", tf32=tf32))
    with ready_client(app) as c:
        reported = c.get("/v1/model").json()["tf32"]
    assert reported == {"enabled": tf32, "matmul": tf32, "cudnn": tf32}
    assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32


# ---- 5. no CPU thread timing on CUDA --------------------------------------------------------------
class FakeCudaPredictor:
    device = torch.device("cuda", 0)

    def __init__(self) -> None:
        self.warmed: list[tuple[int, list[int]]] = []
        self.blank_runs = 0

    def warmup(self, sizes: list[int], stop: object = None) -> float:
        self.warmed.append((torch.get_num_threads(), sizes))
        return 0.0

    def run_blank(self, n: int) -> None:
        self.blank_runs += 1


def test_warm_up_on_cuda_picks_a_small_fixed_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        fake = FakeCudaPredictor()
        chosen = warm_up(fake, [1, 4], all_threads=4)  # type: ignore[arg-type]
        assert chosen == (1, 1)
        assert fake.warmed == [(1, [1, 4])]  # warmed once, at the count it will run at
        assert fake.blank_runs == 0  # no timing of 3 vs 4 threads: it means nothing on a GPU
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ---- 8. a reload warms on its own stream and waits for that stream only ---------------------------
class FakeStream:
    made: ClassVar[list[FakeStream]] = []

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.synced = 0
        FakeStream.made.append(self)

    def synchronize(self) -> None:
        self.synced += 1


def _fake_streams(monkeypatch: pytest.MonkeyPatch) -> list[FakeStream]:
    FakeStream.made = []
    current: list[FakeStream | None] = [None]

    @contextlib.contextmanager
    def use(stream: FakeStream) -> Any:
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    def whole_device(device: Any = None) -> None:
        raise AssertionError("torch.cuda.synchronize would stall live batches behind the warm-up")

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "synchronize", whole_device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0] or FakeStream(device))
    return FakeStream.made


def test_reload_warm_up_runs_on_its_own_stream(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _fake_streams(monkeypatch)
    settings = load_settings(checkpoint=tiny_checkpoint, torch_threads=1, warmup="max", max_batch_size=2)
    cpu_predictor = Predictor.load(tiny_checkpoint, torch.device("cpu"), max_batch_size=2)
    classes = len(cpu_predictor.labels)
    # the device neighbour faked: the forward pass answers on the CPU, run_blank takes the CUDA branch
    cpu_predictor._forward = (  # type: ignore[method-assign]
        lambda images: torch.full((len(images), classes), 1 / classes)
    )
    cpu_predictor._cuda = True
    cpu_predictor.device = torch.device("cuda", 0)
    seen: list[FakeStream | None] = []
    real_blank = cpu_predictor.run_blank

    def run_blank(n: int) -> None:
        seen.append(torch.cuda.current_stream(cpu_predictor.device))
        real_blank(n)

    cpu_predictor.run_blank = run_blank  # type: ignore[method-assign]
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, path, device, **kw: cpu_predictor))
    build_predictor(settings, torch.device("cuda", 0), tiny_checkpoint, warm_threads=(1,))
    side = made[0]
    assert side.device == torch.device("cuda", 0)
    assert seen and all(s is side for s in seen)  # every warm-up batch on the reload's stream
    assert side.synced == len(seen)  # and each waited for that stream only
    with side_stream(torch.device("cpu")):  # the CPU has no streams: a no-op
        pass


def test_run_batch_marks_the_device_failed(tiny_checkpoint: Path) -> None:
    """The unit behind test_app's sticky-error test: the batch function decides, via device_failure."""
    app = create_app(load_settings(checkpoint=tiny_checkpoint, torch_threads=1, warmup="max"))
    with ready_client(app):
        state: ServiceState = app.state.convserve

        def sticky(jobs: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        state.predictor.run = sticky  # type: ignore[method-assign]
        job = service.state.Job(torch.zeros(state.predictor.input_shape, dtype=torch.uint8), 1, False,
                                state.predictor)
        with pytest.raises(RuntimeError):
            state.run_batch([job])
        assert state.device_failed is not None and "illegal memory access" in state.device_failed
