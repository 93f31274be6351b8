"""Temperature scaling, ECE, the per-epoch history in the checkpoint, reliability.png and samples.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from model.registry import build_model
from training import fit
from training.calibrate import T_MIN, calibrate, ece, fit_temperature, nll, reliability
from training.reports import sample_order
from training.runs import history_meta

from .conftest import tiny_config

HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr"}


def calibrated_logits(n: int = 4000, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is calibrated by construction: each label is drawn from it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
    return z, y


def test_over_confident_logits_get_a_temperature_above_one_and_a_lower_ece() -> None:
    z, y = calibrated_logits()
    logits = 3 * z  # three times too sharp: the right temperature is about 3
    record = calibrate(logits, y)
    assert 2.6 < record["temperature"] < 3.5
    assert record["ece_after"] < record["ece_before"] / 3 and record["ece_after"] < 0.03
    assert record["nll_after"] < record["nll_before"]
    assert record["note"] == "" and not record["at_bound"]
    # the stored ECE is the one of softmax(logits / stored T)
    after = (logits / record["temperature"]).softmax(dim=1)
    assert record["ece_after"] == pytest.approx(ece(after, y), rel=1e-4)


def test_under_confident_logits_get_a_temperature_below_one() -> None:
    z, y = calibrated_logits(seed=1)
    t = fit_temperature(z / 2, y)
    assert 0.4 < t < 0.6
    # a minimum: the NLL is higher on both sides
    assert nll(z / 2, y, t) < min(nll(z / 2, y, t * 1.1), nll(z / 2, y, t / 1.1))


def test_the_fit_is_deterministic() -> None:
    z, y = calibrated_logits(seed=2)
    assert calibrate(2 * z, y) == calibrate(2 * z, y)


def test_a_split_without_mistakes_keeps_the_raw_softmax() -> None:
    # every image right: the NLL falls all the way to the lower bound, which is no reason to sharpen
    z, _ = calibrated_logits(n=200, seed=3)
    record = calibrate(z, z.argmax(dim=1))
    assert record["fitted_temperature"] == pytest.approx(T_MIN, rel=1e-3) and record["at_bound"]
    assert record["temperature"] == 1.0 and "too few mistakes" in record["note"]
    assert record["ece_after"] == record["ece_before"]


def test_ece_and_reliability_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.58, 0.42], [0.55, 0.45]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0])
    # bins of width 1/15: 0.9 -> bin 13 (right); 0.58 (wrong) and 0.55 (right) -> bin 8, (8/15, 9/15]
    assert ece(probs, targets) == pytest.approx((abs(1 - 0.9) + abs(1 - 0.58 - 0.55)) / 3)
    rel = reliability(probs, targets)
    assert rel["count"] == [0] * 8 + [2] + [0] * 4 + [1] + [0]
    assert rel["accuracy"][8] == 0.5 and rel["confidence"][8] == 0.565
    assert rel["accuracy"][13] == 1.0 and rel["confidence"][13] == 0.9
    assert rel["accuracy"][0] is None and rel["confidence"][0] is None


def test_sample_order_puts_mistakes_first() -> None:
    predicted = [0, 1, 2, 0, 1, 2]
    targets = [0, 0, 2, 1, 1, 0]  # mistakes at 1, 3, 5
    confidence = [0.9, 0.6, 0.5, 0.95, 0.7, 0.6]
    # mistakes, most confident first (ties in data-set order); then correct ones, least confident first
    assert sample_order(predicted, targets, confidence) == [3, 1, 5, 2, 4, 0]
    assert sample_order([], [], []) == []


def test_history_meta_rounds_and_drops_top5_below_five_classes() -> None:
    row = {"epoch": 1, "lr": 0.0012345678, "train_loss": 1.23456789, "train_acc": 0.5, "val_loss": 2.0,
           "val_acc": 0.333333333, "val_top5": 1.0, "seconds": 3.0}
    assert history_meta([row], 3) == [
        {"epoch": 1, "train_loss": 1.2346, "val_loss": 2.0, "val_top1": 0.33333, "val_top5": None,
         "lr": 0.0012346}
    ]
    assert history_meta([row], 5)[0]["val_top5"] == 1.0


def test_calibration_round_trips_and_older_checkpoints_load_without_it(tmp_path: Path) -> None:
    z, y = calibrated_logits(n=300, seed=4)
    record = calibrate(2 * z, y)
    model = build_model("convnet", 3, 3, 32)
    meta = CheckpointMeta(arch="convnet", labels=["a", "b", "c"], preprocess={"size": 32}, calibration=record)
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    assert load_checkpoint(tmp_path / "m.safetensors").meta.calibration == record
    # metadata written before the field existed has no "calibration" key
    old = json.loads(meta.to_json())
    del old["calibration"]
    assert CheckpointMeta.from_json(json.dumps(old)).calibration == {}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> fit.FitResult:
    return fit.train(tiny_config(tmp_path_factory.mktemp("calib"), epochs=3))


def test_a_run_stores_one_history_row_per_epoch(run: fit.FitResult) -> None:
    for name in ("model.safetensors", "last.safetensors"):
        history = read_meta(run.out / name).training["history"]
        assert [h["epoch"] for h in history] == [1, 2, 3], name  # the best holds the whole run too
        assert all(set(h) == HISTORY_KEYS for h in history)
        assert all(isinstance(h[k], float) for h in history for k in HISTORY_KEYS - {"epoch"})
    history = read_meta(run.out / "model.safetensors").training["history"]
    best = read_meta(run.out / "model.safetensors").training["best_epoch"]
    assert history[best - 1]["val_top1"] == pytest.approx(run.best_accuracy, abs=1e-4)


def test_a_run_calibrates_the_best_model_and_reports_it(run: fit.FitResult) -> None:
    meta = read_meta(run.out / "model.safetensors")
    cal = meta.calibration
    assert cal["method"] == "temperature" and cal["images"] == 24 and cal["bins"] == 15
    assert T_MIN <= cal["temperature"] <= 20 and math.isfinite(cal["ece_after"])
    assert cal["nll_after"] <= cal["nll_before"] + 1e-4  # T = 1 is inside the range searched
    for key in ("before", "after"):
        rel = cal["reliability"][key]
        assert sum(rel["count"]) == 24 and len(rel["accuracy"]) == 15
        # the stored bins reproduce the stored ECE
        gaps = sum(k * abs(a - c) for k, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"],
                                                       strict=True) if k)
        assert gaps / 24 == pytest.approx(cal[f"ece_{key}"], abs=1e-4)
    assert read_meta(run.out / "last.safetensors").calibration == {}  # only the best model is fitted
    report = json.loads((run.out / "report.json").read_text())
    assert report["calibration"]["temperature"] == cal["temperature"]
    assert "expected calibration error" in (run.out / "report.md").read_text()
    for png in ("reliability.png", "samples.png"):
        assert (run.out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-saving with the record kept the weights the best epoch wrote
    loaded = load_checkpoint(run.out / "model.safetensors")
    assert loaded.meta.weights_sha256 == meta.weights_sha256
