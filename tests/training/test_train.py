"""Training end to end on tiny settings: outputs, checkpoint metadata, resume, image folders."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import load_checkpoint, read_meta, weights_sha256
from model.preprocess import Preprocess
from training import fit, shapes
from training.config import ConfigError
from training.engine import EvalResult, evaluate
from training.runs import load_state

from .conftest import tiny_config

OUTPUTS = (
    "model.safetensors",
    "last.safetensors",
    "train_state.pt",
    "history.csv",
    "loss.png",
    "accuracy.png",
    "confusion_matrix.png",
    "reliability.png",
    "samples.png",
    "report.json",
    "report.md",
)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> fit.FitResult:
    """One short shapes run shared by the tests that only read its outputs."""
    return fit.train(tiny_config(tmp_path_factory.mktemp("shapes"), epochs=2))


def test_a_short_run_writes_every_output(shapes_run: fit.FitResult) -> None:
    out = shapes_run.out
    assert [name for name in OUTPUTS if not (out / name).is_file()] == []
    for png in ("loss.png", "accuracy.png", "confusion_matrix.png", "reliability.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5"} <= set(rows[0])
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 24 and len(report["per_class"]) == len(shapes.CLASSES)
    assert set(report["per_class"]["circle"]) == {"precision", "recall", "f1", "support"}
    assert report["top1"] == pytest.approx(shapes_run.best_accuracy)
    assert 0 <= report["top1"] <= report["top5"] <= 1
    assert sum(map(sum, report["confusion_matrix"])) == 24
    md = (out / "report.md").read_text()
    assert "top-1 accuracy" in md and "| circle |" in md


def test_checkpoint_loads_and_describes_the_run(shapes_run: fit.FitResult) -> None:
    loaded = load_checkpoint(shapes_run.out / "model.safetensors")
    meta = loaded.meta
    assert meta.arch == "convnet" and meta.labels[:3] == ["circle", "ring", "triangle"]
    assert meta.input_shape == (3, 32, 32)
    assert Preprocess.from_dict(meta.preprocess).size == 32
    assert meta.arch_config["head"]["pool"] == "gap"
    t = meta.training
    assert t["data"] == "shapes" and t["torch"] == torch.__version__ and t["date"].startswith("20")
    assert t["best_epoch"] == shapes_run.best_epoch and t["checkpoint"] == "best"
    assert t["best_val"]["top1"] == pytest.approx(shapes_run.best_accuracy)
    assert t["data_args"]["seed"] == 0 and t["train_images"] == 48 and t["val_images"] == 24
    last = read_meta(shapes_run.out / "last.safetensors")
    assert last.training["checkpoint"] == "last" and last.training["epochs"] == 2
    # the last checkpoint holds the final weights, bit for bit
    final = load_checkpoint(shapes_run.out / "last.safetensors").model.state_dict()
    for name, tensor in shapes_run.model.state_dict().items():
        assert torch.equal(final[name], tensor.cpu()), name


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    # a step schedule: its rates do not depend on the planned epoch count, unlike cosine
    kw = {"schedule": "step", "step_size": 1, "gamma": 0.5, "warmup_epochs": 0.5}
    whole = fit.train(tiny_config(tmp_path, epochs=2, out=str(tmp_path / "whole"), **kw))
    first = fit.train(tiny_config(tmp_path, epochs=1, out=str(tmp_path / "part"), **kw))
    assert first.epochs_run == 1
    state = load_state(tmp_path / "part" / "train_state.pt")
    assert state["epoch"] == 1
    assert set(state) >= {"optimizer", "schedule", "model", "history", "rng", "cuda_rng"}
    assert state["cuda_rng"] is None  # a CPU run: only the CPU generator is in play
    resumed = fit.train(
        tiny_config(
            tmp_path,
            epochs=2,
            out=str(tmp_path / "part"),
            resume=str(tmp_path / "part" / "train_state.pt"),
            **kw,
        ),
        state,
    )
    assert resumed.epochs_run == 2
    assert len(load_state(tmp_path / "part" / "train_state.pt")["history"]) == 2
    # same data order, same RNG, same optimizer state: the same weights as never stopping
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name



def _resume_elsewhere_state(tmp_path: Path) -> dict[str, Any]:
    """A one-epoch run in tmp_path/first, its state made unbeatable: no epoch after a resume improves."""
    fit.train(tiny_config(tmp_path, out=str(tmp_path / "first")))
    state = load_state(tmp_path / "first" / "train_state.pt")
    # accuracy 1 at loss 0 cannot be beaten, so the resumed run never writes model.safetensors itself
    state["best"] = {**state["best"], "acc": 1.0, "loss": 0.0}
    return state


def test_resume_into_another_out_folder_carries_the_best_model(tmp_path: Path) -> None:
    state = _resume_elsewhere_state(tmp_path)
    resume = str(tmp_path / "first" / "train_state.pt")
    resumed = fit.train(tiny_config(tmp_path, epochs=2, out=str(tmp_path / "second"), resume=resume), state)
    assert resumed.epochs_run == 2 and resumed.best_epoch == 1
    best = tmp_path / "second" / "model.safetensors"
    # the same weights (re-saved with this run's calibration record and full history)
    first = read_meta(tmp_path / "first" / "model.safetensors")
    assert read_meta(best).weights_sha256 == first.weights_sha256
    assert read_meta(best).calibration["temperature"] == first.calibration["temperature"]
    report = json.loads((tmp_path / "second" / "report.json").read_text())
    assert report["checkpoint"] == str(best) and report["epoch"] == 1
    assert read_meta(best).training["best_epoch"] == 1


def test_resume_into_another_out_folder_without_the_best_model_is_refused(tmp_path: Path) -> None:
    state = _resume_elsewhere_state(tmp_path)
    (tmp_path / "first" / "model.safetensors").unlink()
    cfg = tiny_config(
        tmp_path, epochs=2, out=str(tmp_path / "second"), resume=str(tmp_path / "first" / "train_state.pt")
    )
    with pytest.raises(ConfigError, match=r"best model so far \(epoch 1\).*missing"):
        fit.train(cfg, state)
    assert not (tmp_path / "second" / "model.safetensors").exists()

# The CUDA case runs where a GPU is present (collected, not skipped, so a CPU-only CI run skips nothing).
@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_resume_restores_the_random_streams_the_run_draws_from(device: str) -> None:
    dev = torch.device(device)
    saved = fit._rng_state(dev)
    assert (saved["cuda_rng"] is None) == (dev.type == "cpu")
    expected = (torch.rand(4), torch.rand(4, device=dev))
    fit._restore_rng(saved, dev)
    again = (torch.rand(4), torch.rand(4, device=dev))
    assert all(torch.equal(a, b) for a, b in zip(expected, again, strict=True))
    # a train_state.pt written before the CUDA states were saved still resumes (CPU stream restored)
    legacy = {"rng": saved["rng"]}
    fit._restore_rng(legacy, dev)
    assert torch.equal(torch.rand(4), expected[0])


def test_training_on_an_image_folder_reports_unreadable_files(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(
        tmp_path,
        data=f"folder:{image_folder}",
        epochs=3,
        image_size=16,
        lr=0.02,
        batch_size=8,
        val_fraction=0.25,
        crop_scale=0.0,
        rotation=0.0,
        jitter=0.0,
    )
    with caplog.at_level(logging.WARNING):
        result = fit.train(cfg)
    warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warning) == 1 and "skipped 1 unreadable file(s)" in warning[0] and "broken0.jpg" in warning[0]
    meta = read_meta(result.out / "model.safetensors")
    assert meta.labels == ["blue", "green", "red"]
    assert meta.training["skipped_files"] == 1
    assert meta.training["train_images"] + meta.training["val_images"] == 24  # 3 x 8, the broken file skipped
    assert json.loads((result.out / "report.json").read_text())["skipped_files"] == 1
    assert result.best_accuracy == 1.0  # three solid colours: trivially separable


# Validation accuracy per epoch, scripted (of 24 images): best at epoch 2, then two epochs without a
# better one. With --patience 2 the run stops after epoch 4; one more epoch would have found 22/24.
SCRIPTED_CORRECT = [6, 18, 12, 12, 22, 22]


def test_early_stopping_counts_patience_and_keeps_the_best_epochs_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real evaluation runs each epoch; its confusion matrix is replaced by a scripted one (the
    neighbour: what the accuracy is), and the weights it evaluated are recorded, so the test knows
    which epoch's weights each checkpoint must hold."""
    evaluated: list[str] = []  # sha256 of the weights validated at each epoch

    def scripted(model: torch.nn.Module, *args: Any, **kwargs: Any) -> EvalResult:
        real = evaluate(model, *args, **kwargs)
        evaluated.append(weights_sha256(model.state_dict()))
        correct = SCRIPTED_CORRECT[len(evaluated) - 1]
        confusion = torch.zeros_like(real.confusion)
        confusion[0, 0], confusion[0, 1] = correct, real.count - correct
        return EvalResult(confusion, loss_sum=1.0 * real.count, top5_correct=real.count)

    monkeypatch.setattr(fit, "evaluate", scripted)
    with caplog.at_level(logging.INFO, logger="training.fit"):
        result = fit.train(tiny_config(tmp_path, epochs=6, patience=2, lr=0.05))

    assert result.epochs_run == len(evaluated) == 4  # epochs 3 and 4 did not beat epoch 2: patience spent
    assert len(set(evaluated)) == 4  # the premise: every epoch moved the weights
    assert result.best_epoch == 2 and result.best_accuracy == pytest.approx(18 / 24)
    assert "early stop: no better validation accuracy for 2 epochs" in caplog.text
    out = result.out
    assert [r["epoch"] for r in csv.DictReader((out / "history.csv").open())] == ["1", "2", "3", "4"]
    # the served model is epoch 2's weights, not the last epoch's; last.safetensors is epoch 4's
    best = read_meta(out / "model.safetensors")
    assert best.weights_sha256 == evaluated[1] != evaluated[3]
    assert best.training["checkpoint"] == "best" and best.training["best_epoch"] == 2
    assert read_meta(out / "last.safetensors").weights_sha256 == evaluated[3]
    assert weights_sha256(load_checkpoint(out / "model.safetensors").model.state_dict()) == evaluated[1]
    report = json.loads((out / "report.json").read_text())
    assert report["epoch"] == 2 and report["top1"] == pytest.approx(18 / 24)
    state = load_state(out / "train_state.pt")
    assert state["bad_epochs"] == 2 and state["best"]["epoch"] == 2


def test_init_weights_and_frozen_backbone(shapes_run: fit.FitResult, tmp_path: Path) -> None:
    start = shapes_run.out / "last.safetensors"
    result = fit.train(tiny_config(tmp_path, init_weights=str(start), freeze_backbone=True, lr=0.05))
    before = load_checkpoint(start).model.state_dict()
    after = {k: v.cpu() for k, v in result.model.state_dict().items()}
    conv_w = "features.0.weight"
    assert torch.equal(after[conv_w], before[conv_w])  # frozen: the backbone did not move
    # ... nor did its batch-norm running statistics (they would drift in train mode)
    stats = [k for k in before if k.startswith("features.") and k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], before[k]) for k in stats)
    assert not torch.equal(after["head.5.weight"], before["head.5.weight"])  # the head trained
    assert read_meta(result.out / "model.safetensors").training["init_weights"] == "last.safetensors"
