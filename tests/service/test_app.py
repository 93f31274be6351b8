"""Settings, CLI, device choice and failure paths that need a hook into the process (in-process app)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # starlette asks for httpx2, which is not installed here
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

import model.device
from service.app import create_app
from service.settings import Settings, SettingsError, load_settings
from service.state import ServiceState
from tests import images
from tests.conftest import REPO
from tests.service.helpers import ready_client


def _settings(checkpoint: Path, **kw: Any) -> Settings:
    return load_settings(**{"checkpoint": checkpoint, "torch_threads": 1, "warmup": "max", **kw})


# ---- settings and CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"max_batch_size": 0}, "max_batch_size (--max-batch-size / CONVSERVE_MAX_BATCH_SIZE)"),
        ({"device": "tpu"}, "setting device"),
        ({"log_format": "xml"}, "setting log_format"),
        ({"request_timeout_s": 0}, "setting request_timeout_s"),
        ({"precision": "fp8"}, "setting precision"),
        ({"queue_limit": 8, "max_images_per_request": 9}, "max_images_per_request (--max-images-per-request"),
    ],
)
def test_bad_settings_name_the_setting(tiny_checkpoint: Path, overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError, match="invalid settings") as e:
        load_settings(checkpoint=tiny_checkpoint, **overrides)
    assert named in str(e.value)


def test_settings_from_environment(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("CONVSERVE_CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CONVSERVE_WARMUP", "pow2")
    s = load_settings()
    assert s.cors_origins == ["http://a.test", "http://b.test"]
    assert s.warmup_sizes() == [1, 2, 4, 8]
    assert load_settings(max_batch_size=6, warmup="pow2").warmup_sizes() == [1, 2, 4, 6]
    assert load_settings(max_batch_size=3).warmup_sizes() == [1, 2, 3]
    monkeypatch.setenv("CONVSERVE_CHECKPOINT", "/nonexistent/model.safetensors")
    with pytest.raises(SettingsError, match="no checkpoint file at /nonexistent"):
        load_settings()


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    full_env.update(env or {}, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_has_a_flag_for_every_setting() -> None:
    out = _run(["-m", "service", "--help"])
    assert out.returncode == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out.stdout
        assert "CONVSERVE_" + name.upper() in out.stdout.replace("\n", "").replace(" ", "")


def test_cli_and_uvicorn_refuse_bad_settings(tiny_checkpoint: Path) -> None:
    cli = _run(["-m", "service", "--checkpoint", str(tiny_checkpoint), "--max-batch-size", "0"])
    assert cli.returncode == 2
    assert "max_batch_size" in cli.stderr and "CONVSERVE_MAX_BATCH_SIZE" in cli.stderr
    env = {"CONVSERVE_CHECKPOINT": str(tiny_checkpoint), "CONVSERVE_QUEUE_LIMIT": "0"}
    uv = _run(["-m", "uvicorn", "service.app:create_app", "--factory", "--port", "0"], env)
    assert uv.returncode != 0
    assert "CONVSERVE_QUEUE_LIMIT" in uv.stderr + uv.stdout


def test_unloadable_checkpoint_stops_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(images.jpeg())
    out = _run(["-m", "service", "--checkpoint", str(bad), "--port", "0"])
    assert out.returncode == 2
    assert "cannot serve --checkpoint" in out.stderr and "not a readable safetensors file" in out.stderr
    env = {"CONVSERVE_CHECKPOINT": str(bad)}
    uv = _run(["-m", "uvicorn", "service.app:create_app", "--factory", "--port", "0"], env)
    assert uv.returncode != 0
    assert "cannot start" in uv.stderr and "not a readable safetensors file" in uv.stderr


# ---- device choice -------------------------------------------------------------------------------
def test_auto_device_without_cuda_serves_on_cpu(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model.device, "cuda_device_count", lambda: 0)
    with ready_client(create_app(_settings(tiny_checkpoint, device="auto"))) as c:
        assert c.get("/v1/model").json()["device"] == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_missing_cuda_device_stops_start_up(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, device: str, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(model.device, "cuda_device_count", lambda: 2 if device == "cuda:3" else 0)
    app = create_app(_settings(tiny_checkpoint, device=device))
    with pytest.raises(ValueError, match="CUDA device"), TestClient(app):
        pass
    assert any("cannot start" in r.getMessage() and device in r.getMessage() for r in caplog.records)


# ---- failures inside the process ------------------------------------------------------------------
def _fail_first_batch(state: ServiceState, error: Exception) -> None:
    real_run = state.predictor.run
    calls = 0

    def explode_once(jobs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return real_run(jobs)

    state.predictor.run = explode_once  # type: ignore[method-assign]


def test_model_exception_fails_only_its_batch(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-off exception (a bug hit by one batch on the CPU) fails that batch; the replica serves on."""
    app = create_app(_settings(tiny_checkpoint))
    with ready_client(app) as c:
        state: ServiceState = app.state.convserve
        _fail_first_batch(state, RuntimeError("boom: a shape mismatch in this batch"))
        with caplog.at_level(logging.ERROR):
            bad = c.post("/v1/predict", content=images.jpeg(), headers={"X-Request-ID": "req-500"})
        assert bad.status_code == 500
        assert bad.json()["error"]["code"] == "internal_error"
        assert bad.headers["x-request-id"] == "req-500" == bad.json()["error"]["request_id"]
        assert any(r.exc_info and "shape mismatch" in str(r.exc_info[1]) for r in caplog.records)
        assert any("req-500" in r.getMessage() for r in caplog.records)
        good = c.post("/v1/predict", content=images.jpeg())
        assert good.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        metrics = c.get("/metrics").text
        assert 'convserve_rejected_images_total{protocol="v1",reason="internal_error"} 1.0' in metrics


def test_sticky_cuda_error_fails_liveness_and_readiness(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An illegal memory access poisons the CUDA context: every later batch would fail. The replica
    says so on /healthz and /readyz (503 device_failed), so the orchestrator replaces it, and
    refuses work at once instead of answering 500 forever."""
    app = create_app(_settings(tiny_checkpoint))
    with ready_client(app) as c:
        state: ServiceState = app.state.convserve
        _fail_first_batch(state, RuntimeError("CUDA error: an illegal memory access was encountered"))
        with caplog.at_level(logging.ERROR):
            bad = c.post("/v1/predict", content=images.jpeg())
        assert bad.status_code == 503 and bad.json()["error"]["code"] == "device_failed"
        assert any("illegal memory access" in r.getMessage() and r.levelno == logging.CRITICAL
                   for r in caplog.records)
        for probe in ("/healthz", "/readyz"):
            r = c.get(probe)
            assert r.status_code == 503, probe
            assert r.json()["error"]["code"] == "device_failed"
            assert "illegal memory access" in r.json()["error"]["message"]
        # the model would answer again (the fake fails once), but a failed device is never trusted
        again = c.post("/v1/predict", content=images.jpeg())
        assert again.status_code == 503 and again.json()["error"]["code"] == "device_failed"
        metrics = c.get("/metrics").text
        assert 'convserve_rejected_images_total{protocol="v1",reason="device_failed"} 2.0' in metrics
        assert "convserve_ready 0.0" in metrics


def test_nan_output_fails_its_request_and_keeps_the_metrics_finite(tiny_checkpoint: Path) -> None:
    app = create_app(_settings(tiny_checkpoint))
    with ready_client(app) as c:
        state: ServiceState = app.state.convserve
        real_forward = state.predictor.forward

        def nan_first_row(batch: Any) -> Any:
            probs = real_forward(batch).clone()  # an inference tensor: copy before editing
            probs[0] = float("nan")  # what an fp16 overflow looks like after softmax
            return probs

        state.predictor.forward = nan_first_row  # type: ignore[method-assign]
        r = c.post("/v1/predict", content=images.jpeg())
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "NonFiniteOutput" in r.json()["error"]["message"]
        metrics = c.get("/metrics").text
        assert 'convserve_rejected_images_total{protocol="v1",reason="internal_error"} 1.0' in metrics
        assert "convserve_top1_confidence_sum nan" not in metrics.lower()
        state.predictor.forward = real_forward  # type: ignore[method-assign]
        assert c.post("/v1/predict", content=images.jpeg()).status_code == 200


def test_reload_disabled_without_an_admin_key(tiny_checkpoint: Path) -> None:
    with ready_client(create_app(_settings(tiny_checkpoint))) as c:
        r = c.post("/v1/model/reload", headers={"X-API-Key": "anything"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "reload_disabled"
        assert "CONVSERVE_ADMIN_API_KEY" in r.json()["error"]["message"]


def test_json_logs(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    with ready_client(create_app(_settings(tiny_checkpoint, log_format="json"))):
        pass
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert any(d["logger"] == "service.app" and d["message"].startswith("ready:") for d in lines)
    logging.getLogger().handlers = [
        h for h in logging.getLogger().handlers if not getattr(h, "_convserve", False)
    ]


def test_traced_model_answers_like_eager(tiny_checkpoint: Path) -> None:
    answers = []
    for mode in ("off", "trace"):
        app = create_app(_settings(tiny_checkpoint, compile=mode, max_batch_size=2, warmup="all"))
        with ready_client(app) as c:
            assert c.get("/v1/model").json()["compile"] == mode
            answers.append(c.post("/v1/predict", content=images.jpeg(), params={"top_k": 6}).json())
    eager, traced = (a["predictions"] for a in answers)
    assert [p["index"] for p in eager] == [p["index"] for p in traced]
    for p, q in zip(eager, traced, strict=True):
        assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)


# ---- reload: one request, one model --------------------------------------------------------------
def test_jobs_run_on_the_model_their_request_started_with(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """After a swap to a model with the same preprocessing, jobs queued for the old model still run on
    it, so a multi-image request split over several batches is answered by one model."""
    from service.decode import decode_to_tensor
    from service.predictor import Job, Predictor
    from tests.conftest import make_checkpoint

    app = create_app(_settings(tiny_checkpoint))
    with ready_client(app):
        state: ServiceState = app.state.convserve
        old = state.predictor
        new = Predictor.load(make_checkpoint(tmp_path / "v2.safetensors", seed=1, version="2"), old.device)
        assert new.preprocess == old.preprocess
        state.predictor = new  # what a reload does
        image = decode_to_tensor(images.jpeg(), old.preprocess, 10**7)
        results = state.run_batch([Job(image, 3, False, old), Job(image, 3, False, new)])
    assert [r.model["version"] for r in results] == ["1", "2"]


@pytest.mark.parametrize(("mode", "on_inference_thread"), [("off", False), ("compile", True)])
def test_reload_compiles_on_the_inference_thread(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, mode: str, on_inference_thread: bool
) -> None:
    """torch.compile is not thread-safe, so a compile-mode reload builds its graphs on the thread
    that runs the model; eager reloads warm up beside the serving thread. The warm-up itself (the
    neighbour here) only records where it ran, so no compiler is needed."""
    import threading

    import service.state

    ran_on: list[str] = []
    def record(*args: Any) -> float:
        ran_on.append(threading.current_thread().name)
        return 0.0

    monkeypatch.setattr(service.state, "warm_at", record)
    app = create_app(_settings(tiny_checkpoint, compile=mode, admin_api_key="k"))
    with ready_client(app) as c:
        ran_on.clear()  # start-up warms on the inference thread in every mode
        r = c.post("/v1/model/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
    assert len(ran_on) == 1
    assert ran_on[0].startswith("inference") is on_inference_thread, ran_on
