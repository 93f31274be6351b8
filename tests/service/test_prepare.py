"""`python -m service prepare` (service/prepare.py): the one-off work of a first start under
--runtime auto, done before the server starts, and a server with the same settings that then starts
as a later start (the decision read back, nothing exported or timed in the serving process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import service.predictor
from service import prepare
from service.settings import load_settings
from tests.conftest import REPO, run_server
from tests.service.test_runtime_auto import needs_ort

# As run_server starts its servers: the decision's key holds the torch threads, so prepare must be
# given the server's value (the deployment manifests give both the same variables).
SERVER_LIKE = {"CONVSERVE_DEVICE": "cpu", "CONVSERVE_TORCH_THREADS": "1"}


def run_prepare(ckpt: Path, *flags: str) -> tuple[int, dict[str, Any] | None, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env |= SERVER_LIKE | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "service", "prepare", "--checkpoint", str(ckpt), *flags],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return out.returncode, json.loads(lines[-1]) if lines else None, out.stderr


@needs_ort
def test_prepare_decides_and_the_server_starts_from_its_decision(tiny_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    rc, got, err = run_prepare(ckpt, "--runtime", "auto", "--max-batch-size", "4")
    assert rc == 0, err
    assert got is not None and got["measured"] is True
    kept = ckpt.with_name("m.safetensors.runtime-choice.json")
    assert got["kept_in"] == str(kept) and kept.is_file()
    assert got["runtime"] in ("torch", "onnxruntime")
    assert got["reason"].startswith(f"auto: {got['runtime']}, ") and "onnxruntime took" in got["reason"]
    assert ckpt.with_name("m.safetensors.onnxruntime.onnx").is_file()  # exported once, here

    (tmp_path / "serve").mkdir()
    with run_server(ckpt, tmp_path / "serve", runtime="auto", max_batch_size=4) as server:
        choice = server.client.get("/v1/model").json()["runtime_choice"]  # at ready: nothing pending
        log = server.log_text()
    assert choice["pending"] is False and choice["runtime"] == got["runtime"]
    assert choice["reason"].startswith(got["reason"]) and "measured by an earlier start" in choice["reason"]
    assert "building it now" not in log and "exported m.safetensors" not in log

    again, second, err = run_prepare(ckpt, "--runtime", "auto", "--max-batch-size", "4")
    assert again == 0, err
    assert second is not None and second["measured"] is False and second["kept_in"] == str(kept)
    # other settings are another key: measured again, added beside the first entry
    rc, third, err = run_prepare(ckpt, "--runtime", "auto", "--max-batch-size", "2")
    assert rc == 0 and third is not None and third["measured"] is True, err
    assert len(json.loads(kept.read_text())["entries"]) == 2


def test_prepare_with_nothing_to_decide_exports_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    rc, got, err = run_prepare(ckpt, "--runtime", "torch")
    assert rc == 0, err
    assert got == {"runtime": "torch", "reason": "set by --runtime torch", "measured": False,
                   "kept_in": None, "took_s": got["took_s"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_prepare_names_a_bad_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    rc, got, err = run_prepare(bad)
    assert rc == 2 and got is None
    assert "cannot serve --checkpoint" in err and "broken.safetensors" in err


@needs_ort
def test_a_candidate_that_cannot_run_is_reported_and_prepare_succeeds(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server would serve torch and say why: nothing to keep, and no reason to fail a deployment."""
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    real = service.predictor.build_runtime

    def build(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise RuntimeError("no session today")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(service.predictor, "build_runtime", build)
    settings = load_settings(checkpoint=ckpt, runtime="auto", device="cpu", torch_threads=1)
    assert prepare.main(settings) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["runtime"] == "torch" and got["measured"] is False and got["kept_in"] is None
    assert "onnxruntime could not run the model (no session today)" in got["reason"]
