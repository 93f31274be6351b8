"""The served probabilities are softmax(logits / T) with the checkpoint's temperature, softmax(logits)
with --no-calibration or a checkpoint that has none; /v1/model says which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.preprocess import open_image
from service.predictor import Predictor
from tests import images
from tests.conftest import make_checkpoint, run_server

T = 0.4  # sharpening: the tiny random model's near-uniform probabilities move visibly


def calibrated_checkpoint(tmp: Path, temperature: object = T) -> Path:
    path = make_checkpoint(tmp / "plain.safetensors", seed=3)
    loaded = load_checkpoint(path)
    loaded.meta.calibration = {"method": "temperature", "temperature": temperature, "ece_before": 0.2,
                               "ece_after": 0.05, "bins": 15}
    save_checkpoint(tmp / "calibrated.safetensors", loaded.model, loaded.meta)
    return tmp / "calibrated.safetensors"


def test_the_service_divides_logits_by_the_temperature(tmp_path: Path) -> None:
    ckpt = calibrated_checkpoint(tmp_path)
    photo = images.encode(images.photo_image((64, 48)), "PNG")
    loaded = load_checkpoint(ckpt)
    x = loaded.preprocess.eval_transform()(open_image(photo, loaded.preprocess))  # (C, H, W)
    with torch.no_grad():
        z = loaded.model(x[None]).double()[0]  # (K,) logits of the checkpoint's own model
    served = {}
    for calibration in (True, False):
        with run_server(ckpt, tmp_path, calibration=str(calibration).lower()) as server:
            upload = {"file": ("p.png", photo, "image/png")}
            r = server.client.post("/v1/predict?probabilities=all", files=upload)
            assert r.status_code == 200, r.text
            served[calibration] = torch.tensor(r.json()["probabilities"], dtype=torch.float64)
            info = server.client.get("/v1/model").json()["calibration"]
            assert info["applied"] is calibration and info["temperature"] == T
            assert info["ece_after"] == 0.05  # the stored record is reported with it
    assert torch.allclose(served[True], (z / T).softmax(0), atol=1e-4)
    assert torch.allclose(served[False], z.softmax(0), atol=1e-4)
    assert (served[True] - served[False]).abs().max() > 0.01  # the two really differ here


def test_a_checkpoint_without_a_temperature_serves_the_raw_softmax(tmp_path: Path) -> None:
    plain = Predictor.load(make_checkpoint(tmp_path / "old.safetensors"), torch.device("cpu"))
    assert plain.temperature is None
    info = plain.describe()["calibration"]
    assert info["applied"] is False and info["temperature"] is None and "no temperature" in info["reason"]
    off = Predictor.load(calibrated_checkpoint(tmp_path), torch.device("cpu"), calibration=False)
    assert off.temperature is None and "--no-calibration" in off.calibration_info()["reason"]


@pytest.mark.parametrize("bad", [0, -1.5, "2", float("nan"), True])
def test_a_bad_temperature_is_refused_at_load(tmp_path: Path, bad: object) -> None:
    with pytest.raises(CheckpointError, match="temperature"):
        Predictor.load(calibrated_checkpoint(tmp_path, bad), torch.device("cpu"))
