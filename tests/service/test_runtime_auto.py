"""--runtime auto (service/runtime_choice.py): the rule on given numbers, the candidate's conditions,
the decision kept across starts, the warm-up path on a real model, and a live service.

No timing assertions: the rule is driven with fixed timings; the real runs check that a valid choice
was made, the loser dropped, the answers unchanged and the reason given.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import service.precision
import service.predictor
import service.threads
from service import runtime_choice
from service.cpu_flags import cpu_identity
from service.predictor import Predictor
from service.runtime_choice import Choice, Measured, candidate, decide, machine_key, recall, remember
from service.runtimes.base import FP32_TOLERANCE
from service.settings import usable_cores
from service.state import warm_up
from tests import images
from tests.conftest import make_checkpoint, run_server

CPU = torch.device("cpu")
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (extra 'onnx')")


def settled(server: Any, timeout: float = 90.0) -> dict[str, Any]:
    """/v1/model once a first start's runtime trial is over (runtime_choice.pending false)."""
    end = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = server.client.get("/v1/model").json()
        if not info["runtime_choice"]["pending"] or time.monotonic() > end:
            assert not info["runtime_choice"]["pending"], "the runtime trial did not finish"
            return info
        time.sleep(0.1)


def measured(batch: float, lone: float) -> Measured:
    """onnxruntime at `batch` / `lone` times torch's (torch: 100 ms a batch of 8, 20 ms a lone image)."""
    return Measured("onnxruntime", "fp32", 8, 0.100, 0.100 * batch, 0.020, 0.020 * lone)


@pytest.mark.parametrize(
    ("batch", "lone", "want"),
    [
        (0.83, 0.65, "onnxruntime"),  # resnet18 on the Zen 3
        (0.56, 0.44, "onnxruntime"),  # the default convnet there
        (1.04, 0.7, "onnxruntime"),  # a batch within the noise, a lone image much faster
        (0.97, 0.96, "torch"),  # within the noise on both: keep the default's runtime
        (0.6, 1.2, "torch"),  # a lone image 20% slower
        (1.3, 0.5, "torch"),  # batches 30% slower (torch bf16 on bf16 hardware, say)
    ],
)
def test_decide(batch: float, lone: float, want: str) -> None:
    assert decide(measured(batch, lone)).runtime == want


def test_decide_names_the_numbers() -> None:
    c = decide(measured(0.83, 0.65))
    assert c.reason == ("auto: onnxruntime, faster (onnxruntime took 0.83x torch fp32's time at batch 8, "
                        "0.65x on a lone image)")
    assert "needs a mean below 0.95" in decide(measured(0.97, 0.96)).reason


@pytest.mark.parametrize(
    ("batch", "lone", "again"),
    [
        (1.29, 0.62, True),  # the sizes disagree beyond the noise (resnet18 on the Zen 4, one start)
        (0.97, 0.95, True),  # a mean of 0.96: within NEAR of the line
        (0.87, 0.64, False),  # clearly faster on both
        (1.3, 1.2, False),  # clearly slower on both
        (1.04, 0.7, False),  # a batch within the noise, a lone image much faster
    ],
)
def test_unsure_asks_for_a_second_round(batch: float, lone: float, again: bool) -> None:
    assert runtime_choice.unsure(measured(batch, lone)) is again


def test_merged_keeps_each_sides_fastest_run() -> None:
    a, b = measured(1.29, 0.62), measured(0.87, 0.70)
    m = runtime_choice.merged(a, dataclasses.replace(b, torch_batch_s=0.090))
    assert (m.torch_batch_s, m.cand_batch_s) == (0.090, b.cand_batch_s)
    assert (m.torch_one_s, m.cand_one_s) == (a.torch_one_s, a.cand_one_s)
    assert decide(m).runtime == "onnxruntime"  # 0.087 / 0.090 at batch, 0.62 on a lone image


def test_candidate_conditions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert candidate(torch.device("cuda"), "fp32", "off", False)[0] is None
    assert candidate(CPU, "fp32", "trace", False)[1] == "--compile trace is a torch mode"
    assert candidate(CPU, "bf16", "off", False)[0] is None
    assert candidate(CPU, "fp32", "off", True)[0] is None  # an ONNX file: no torch to compare with
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert candidate(CPU, "auto", "off", False) == (None, "onnxruntime is not installed "
                                                           "(pip install 'convserve[onnx]')")


@needs_ort
def test_candidate_where_installed() -> None:
    assert candidate(CPU, "auto", "off", False) == ("onnxruntime", "installed")


def test_cpu_identity(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: other\n")
    ident = cpu_identity(info)
    assert {k: ident[k] for k in ("vendor", "family", "model", "model_name", "stepping")} == {
        "vendor": "AuthenticAMD", "family": "25", "model": "1", "model_name": "AMD EPYC", "stepping": "1"}
    info.write_text(info.read_text().replace("avx2 fma", "avx2 fma avx512f"))
    assert cpu_identity(info)["flags_sha256"] != ident["flags_sha256"]  # same name, other flags
    assert cpu_identity(tmp_path / "missing") == {}


def test_the_choice_is_kept_per_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")
    key = machine_key("a" * 64, "onnxruntime", "fp32", 16, 2)
    assert recall(ckpt, "a" * 64, None, key) is None
    choice = decide(measured(0.8, 0.6))
    where = remember(ckpt, "a" * 64, None, key, choice)
    assert where == tmp_path / "m.safetensors.runtime-choice.json"
    got = recall(ckpt, "a" * 64, None, key)
    assert got is not None and got[0] == choice and got[1] == where
    # anything it depended on differs: measured again
    for other in (machine_key("b" * 64, "onnxruntime", "fp32", 16, 2),
                  machine_key("a" * 64, "onnxruntime", "fp32", 16, 4),
                  machine_key("a" * 64, "onnxruntime", "auto", 16, 2),
                  machine_key("a" * 64, "onnxruntime", "fp32", 32, 2),
                  machine_key("a" * 64, "onnxruntime", "fp32", 16, 2, {"fold_bn": False}),
                  machine_key("a" * 64, "onnxruntime", "fp32", 16, 2, {"torch_threads": 1})):
        assert recall(ckpt, "a" * 64, None, other) is None
    # a second key is added beside the first
    other = machine_key("a" * 64, "onnxruntime", "fp32", 16, 4)
    remember(ckpt, "a" * 64, None, other, decide(measured(1.2, 1.2)))
    entries = json.loads(where.read_text())["entries"]
    assert {e["runtime"] for e in entries.values()} == {"onnxruntime", "torch"}
    where.write_text("{not json")  # damaged: no choice, and the next one rewrites it
    assert recall(ckpt, "a" * 64, None, key) is None
    remember(ckpt, "a" * 64, None, key, choice)
    assert recall(ckpt, "a" * 64, None, key) is not None


def test_an_unwritable_folder_keeps_the_choice_in_the_cache_dir(tmp_path: Path) -> None:
    # the checkpoint's "folder" is a plain file: nothing can be written beside it, even as root
    (tmp_path / "file").write_text("")
    ckpt = tmp_path / "file" / "m.safetensors"
    key = machine_key("a" * 64, "onnxruntime", "fp32", 16, 2)
    where = remember(ckpt, "a" * 64, tmp_path / "cache", key, decide(measured(0.8, 0.6)))
    assert where is not None and where.parent == tmp_path / "cache"
    assert recall(ckpt, "a" * 64, tmp_path / "cache", key) is not None
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # neither place writable: logged, not raised (the next start measures again)
    assert remember(ckpt, "a" * 64, blocked / "sub", key, decide(measured(0.8, 0.6))) is None


def _torch_probs(ckpt: Path, batch: list[torch.Tensor]) -> torch.Tensor:
    return Predictor.load(ckpt, CPU, runtime="torch").forward(batch)


@needs_ort
@pytest.mark.parametrize("winner", ["onnxruntime", "torch"])
def test_warm_up_settles_on_one_runtime_and_the_next_start_reads_it(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """Both outcomes (the rule forced, so the test does not depend on this CPU): warm-up times both,
    keeps one runtime, says why and keeps the decision; the next start builds only the winner."""
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    real = runtime_choice.decide

    def forced(m: Measured) -> Choice:
        assert m.torch_batch_s > 0 and m.cand_batch_s > 0 and m.torch_one_s > 0 and m.cand_one_s > 0
        return dataclasses.replace(real(m), runtime=winner, reason=f"auto: {winner}, forced")

    monkeypatch.setattr(service.threads.runtime_choice, "decide", forced)
    p = Predictor.load(ckpt, CPU, runtime="auto", max_batch_size=4)
    assert p.runtime.name == "torch" and p.runtime_candidate == "onnxruntime" and len(p._runtimes) == 2
    pending = p.describe()["runtime_choice"]
    assert pending["reason"] == "auto: torch until onnxruntime has been timed beside it"
    assert pending["pending"] is True
    _warm(p)
    info = p.describe()
    assert info["runtime"]["name"] == winner and list(p._runtimes) == [p.variant]
    assert info["runtime_choice"]["setting"] == "auto" and info["runtime_choice"]["runtime"] == winner
    assert info["runtime_choice"]["measured"]["batch"] == 4
    g = torch.Generator().manual_seed(0)
    batch = list(torch.randint(0, 256, (3, *p.input_shape), generator=g, dtype=torch.uint8))
    want = _torch_probs(ckpt, batch)
    assert float((p.forward(batch) - want).abs().max()) <= FP32_TOLERANCE
    assert (tmp_path / "m.safetensors.runtime-choice.json").is_file()

    again = Predictor.load(ckpt, CPU, runtime="auto", max_batch_size=4)
    assert again.runtime_candidate is None and len(again._runtimes) == 1
    assert again.runtime.name == winner
    reason = again.describe()["runtime_choice"]["reason"]
    assert reason.startswith(f"auto: {winner}, forced; measured by an earlier start on this machine")
    assert float((again.forward(batch) - want).abs().max()) <= FP32_TOLERANCE


def _warm(p: Predictor) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        warm_up(p, [1, 2, 4], all_threads=2, auto=True)
    finally:
        torch.set_num_threads(before)


@needs_ort
def test_a_candidate_that_fails_leaves_torch_serving(tiny_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter blew up")

    ckpt = tmp_path / "m.safetensors"  # no export cached beside it: the exporter runs
    shutil.copy(tiny_checkpoint, ckpt)
    monkeypatch.setattr("service.runtimes.export.export_onnx", broken)
    p = Predictor.load(ckpt, CPU, runtime="auto", export_cache_dir=tmp_path / "cache")
    assert p.runtime.name == "torch" and p.runtime_candidate is None
    assert p.describe()["runtime_choice"]["reason"] == (
        "auto: torch, onnxruntime could not run the model (exporter blew up)")


@needs_ort
def test_service_reports_its_auto_choice(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    blobs = [images.jpeg(), images.photo_jpeg((96, 80), seed=1)]
    for sub in ("torch", "first", "second"):
        (tmp_path / sub).mkdir()
    with run_server(ckpt, tmp_path / "torch", runtime="torch") as server:
        want = [server.client.post("/v1/predict", content=b, params={"probabilities": "all"}).json()
                for b in blobs]
    for start in ("first", "second"):
        with run_server(ckpt, tmp_path / start, runtime="auto", max_batch_size=4) as server:
            info = settled(server)
            got = [server.client.post("/v1/predict", content=b, params={"probabilities": "all"}).json()
                   for b in blobs]
            log = server.log_text()
        choice = info["runtime_choice"]
        assert choice["setting"] == "auto" and choice["runtime"] == info["runtime"]["name"]
        assert choice["runtime"] in ("torch", "onnxruntime") and choice["measured"]["batch"] == 4
        assert ("earlier start on this machine" in choice["reason"]) == (start == "second")
        assert "runtime auto: " in log
        if start == "first":  # ready on torch first; built and timed after (service/runtime_trial.py)
            order = ["service.app: ready: tiny on cpu (torch, fp32)", "exported m.safetensors",
                     "service.runtime_trial: runtime auto: "]
            assert [log.index(line) for line in order] == sorted(log.index(line) for line in order)
        for w, g in zip(want, got, strict=True):
            assert g["predictions"][0]["index"] == w["predictions"][0]["index"]
            diff = max(abs(a - b) for a, b in zip(g["probabilities"], w["probabilities"], strict=True))
            assert diff <= FP32_TOLERANCE


@needs_ort
def test_a_reload_decides_for_the_new_checkpoint(tmp_path: Path) -> None:
    """A reload under auto measures (or recalls) for the new file and serves its choice."""
    v1 = make_checkpoint(tmp_path / "v1.safetensors", version="1")
    v2 = make_checkpoint(tmp_path / "v2.safetensors", version="2", seed=5)
    with run_server(v1, tmp_path, runtime="auto", admin_api_key="k", max_batch_size=4) as server:
        settled(server)  # the first start's trial is over (a reload during it ends it: not kept then)
        r = server.client.post("/v1/model/reload", json={"checkpoint": str(v2)}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        info = server.client.get("/v1/model").json()
        answer = server.client.post("/v1/predict", content=images.jpeg())
    assert info["version"] == "2" and info["runtime_choice"]["setting"] == "auto"
    assert info["runtime_choice"]["runtime"] == info["runtime"]["name"] in ("torch", "onnxruntime")
    assert info["runtime_choice"]["measured"]["candidate"] == "onnxruntime"
    # timed beside live traffic: not kept for later starts (the first start's own decision is)
    assert not (tmp_path / "v2.safetensors.runtime-choice.json").exists()
    assert (tmp_path / "v1.safetensors.runtime-choice.json").is_file()
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"


@needs_ort
@pytest.mark.parametrize("winner", ["onnxruntime", "torch"])
def test_with_precision_auto_the_runtime_is_timed_against_the_precision_kept(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """--precision auto settles first (bf16 forced as the candidate, and forced to win), then the
    runtime is timed against torch bf16; an fp32 runtime that wins says so in precision_choice."""
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    monkeypatch.setattr(service.predictor, "candidate", lambda device, runtime: ("bf16", "forced"))
    monkeypatch.setattr(service.threads.precision, "AGREEMENT_BAR", 0.0)  # whatever the tiny model does
    monkeypatch.setattr(service.threads.precision, "decide",
                        lambda m: service.precision.Choice("auto", "bf16", "auto: bf16, forced", m))
    seen: list[Measured] = []

    def forced(m: Measured) -> Choice:
        seen.append(m)
        return Choice("auto", winner, f"auto: {winner}, forced", m)

    monkeypatch.setattr(service.threads.runtime_choice, "decide", forced)
    p = Predictor.load(ckpt, CPU, runtime="auto", precision="auto", max_batch_size=4)
    assert set(p._runtimes) == {"fp32", "bf16", "onnxruntime"}
    _warm(p)
    assert seen[0].torch_precision == "bf16"  # timed against what torch would have served
    info = p.describe()
    assert info["runtime"]["name"] == winner and len(p._runtimes) == 1
    if winner == "onnxruntime":
        assert info["precision"] == "fp32" and info["precision_choice"]["precision"] == "fp32"
        assert "onnxruntime runs fp32" in info["precision_choice"]["reason"]
    else:
        assert info["precision"] == "bf16" and info["precision_choice"]["reason"] == "auto: bf16, forced"


@needs_ort
def test_a_kept_choice_that_no_longer_runs_falls_back_to_torch(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime was chosen and kept; its export is gone and cannot be made again: torch serves
    (never a failed start), says why, and the next start measures again."""
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    key = machine_key(Predictor.load(ckpt, CPU).sha256, "onnxruntime", "fp32", 4, usable_cores(),
                      {"fold_bn": True, "channels_last": "auto"})
    remember(ckpt, Predictor.load(ckpt, CPU).sha256, None, key, decide(measured(0.5, 0.5)))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter blew up")

    monkeypatch.setattr("service.runtimes.export.export_onnx", broken)
    p = Predictor.load(ckpt, CPU, runtime="auto", max_batch_size=4)
    assert p.runtime.name == "torch" and p.runtime_candidate is None
    assert p.describe()["runtime_choice"]["reason"] == (
        "auto: torch, onnxruntime was chosen before but cannot run now (exporter blew up)")
