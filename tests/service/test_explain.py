"""POST /v1/explain and /v1/features on a real server, and Grad-CAM's known answer on a trained model."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from service.gradcam import ExplainModel
from tests.conftest import LiveServer, run_server
from training.shapes import CLASSES, SIZE, _mask

# The session fixture trains the default model (~30 s on 2 idle cores); on a loaded shared machine it
# can take several times that, hence a ceiling above pytest's default 300 s.
pytestmark = pytest.mark.timeout(900)

# Triangles are left out on purpose: the trained model's Grad-CAM for "triangle" lands mostly outside
# the triangle (docs/ui.md shows it) - it is a true property of the model, not of the method.
QUADRANT_SHAPES = ("ring", "square", "cross", "arrow", "star")


def shape_in_quadrant(kind: str, quadrant: int, seed: int) -> np.ndarray:
    """A 64x64 image with one shape (radius 12, fits a 32x32 quadrant) in quadrant 0..3 (TL, TR, BL, BR)."""
    rng = np.random.default_rng(seed)
    cx = 16.0 if quadrant in (0, 2) else 48.0
    cy = 16.0 if quadrant in (0, 1) else 48.0
    mask = _mask(kind, cx, cy, 12.0, rng.uniform(0, 2 * math.pi))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    background = rng.uniform(20, 90, size=3).astype(np.float32)
    colour = rng.uniform(170, 250, size=3).astype(np.float32)
    noise = rng.standard_normal((SIZE, SIZE, 3)).astype(np.float32) * 6
    image = background * (1 - alpha) + colour * alpha + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def quadrant_mass(cam: torch.Tensor) -> list[float]:
    h, w = cam.shape
    total = float(cam.sum()) or 1.0
    return [float(q.sum()) / total for q in (cam[: h // 2, : w // 2], cam[: h // 2, w // 2 :],
                                              cam[h // 2 :, : w // 2], cam[h // 2 :, w // 2 :])]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_the_heat_map_lands_in_the_quadrant_holding_the_shape(trained_shapes: Path) -> None:
    loaded = load_checkpoint(trained_shapes)
    pre = loaded.preprocess
    explain = ExplainModel(loaded.model, pre.input_shape, None)
    failures = []
    for k, kind in enumerate(QUADRANT_SHAPES):
        for quadrant in range(4):
            drawn = shape_in_quadrant(kind, quadrant, seed=10 * k + quadrant)
            image = torch.from_numpy(drawn).permute(2, 0, 1)
            cam, _, target = explain.grad_cam(pre.normalize(image[None]), None)
            mass = quadrant_mass(cam)
            # The shape's quadrant holds the most, at least twice any other quadrant and 0.4 of the
            # whole (chance: 0.25). The fixture's weights differ by CPU: on an AMD Zen 3 one square
            # had 0.48 there against 0.22 next, which a flat ">= 0.5" failed.
            others = max(m for i, m in enumerate(mass) if i != quadrant)
            if CLASSES[target] != kind or mass[quadrant] < 0.4 or mass[quadrant] < 2 * others:
                failures.append((kind, quadrant, CLASSES[target], [round(m, 2) for m in mass]))
    assert not failures, failures


def test_the_top_class_and_another_class_get_different_maps(trained_shapes: Path) -> None:
    loaded = load_checkpoint(trained_shapes)
    pre = loaded.preprocess
    explain = ExplainModel(loaded.model, pre.input_shape, None)
    image = torch.from_numpy(shape_in_quadrant("cross", 1, seed=3)).permute(2, 0, 1)
    x = pre.normalize(image[None])
    top, _, t = explain.grad_cam(x, None)
    assert CLASSES[t] == "cross"
    for other in set(range(len(CLASSES))) - {t}:
        cam, _, o = explain.grad_cam(x, other)
        assert o == other
        diff = (top - cam).abs()  # both maps are scaled to a peak of 1
        assert float(diff.max()) > 0.3 and float(diff.mean()) > 0.03, (CLASSES[other], float(diff.max()))


@pytest.fixture(scope="module")
def trained_server(trained_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(trained_shapes, tmp_path_factory.mktemp("explain"), explain_queue_limit=2) as s:
        yield s


def test_explain_answers_predictions_heat_map_and_pngs(trained_server: LiveServer) -> None:
    body = png_bytes(shape_in_quadrant("square", 2, seed=5))
    predicted = trained_server.client.post("/v1/predict", content=body).json()
    r = trained_server.client.post("/v1/explain", content=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["predictions"][0]["label"] == predicted["predictions"][0]["label"] == "square"
    expected = predicted["predictions"][0]["probability"]
    assert doc["predictions"][0]["probability"] == pytest.approx(expected, abs=1e-4)
    assert doc["target"]["label"] == "square"
    grid = np.array(doc["heatmap"]["grid"])
    assert grid.shape == (16, 16) and grid.max() <= 1 and grid.min() >= 0
    assert quadrant_mass(torch.from_numpy(grid))[2] > 0.5
    for key in ("overlay_png", "heatmap_png", "input_png"):
        img = Image.open(io.BytesIO(base64.b64decode(doc[key])))
        assert img.format == "PNG" and img.size == (64, 64)
    # the preprocessed input is what the model saw: here the 64x64 image itself
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["input_png"]))))
    assert np.array_equal(seen, shape_in_quadrant("square", 2, seed=5))

    by_label = trained_server.client.post("/v1/explain?target=circle", content=body).json()
    by_index = trained_server.client.post("/v1/explain?target=0", content=body).json()
    assert by_label["target"]["index"] == by_index["target"]["index"] == 0
    assert by_label["heatmap"]["grid"] != doc["heatmap"]["grid"]


def test_explain_as_png_and_bad_inputs(trained_server: LiveServer) -> None:
    body = png_bytes(shape_in_quadrant("ring", 0, seed=1))
    r = trained_server.client.post("/v1/explain", content=body, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert r.headers["x-target"] == "ring"

    pdf = trained_server.client.post("/v1/explain", content=b"%PDF-1.7 not an image")
    assert pdf.status_code == 415 and "PDF" in pdf.json()["error"]["message"]
    bad = trained_server.client.post("/v1/explain?target=dragon", content=body)
    assert bad.status_code == 422 and "dragon" in bad.json()["error"]["message"]
    out_of_range = trained_server.client.post("/v1/explain?target=99", content=body)
    assert out_of_range.status_code == 422
    assert trained_server.client.post("/v1/explain", content=body).status_code == 200  # still serving
    m = trained_server.metrics()
    assert m['convserve_explanations_total{kind="gradcam",outcome="ok"}'] >= 2
    assert m['convserve_explanation_rejected_total{reason="bad_input"}'] >= 1
    assert m['convserve_explanation_duration_seconds_count{kind="gradcam"}'] >= 2


def test_features_report_geometry_and_a_grid(trained_server: LiveServer) -> None:
    body = png_bytes(shape_in_quadrant("cross", 3, seed=2))
    doc = trained_server.client.post("/v1/features", content=body).json()
    assert doc["layer"] == doc["layers"][0] == "features.0"
    assert doc["kernel_size"] == [3, 3] and doc["stride"] == [1, 1] and doc["padding"] == [1, 1]
    assert doc["output_size"] == [64, 64] and doc["out_channels"] == 16 and doc["channels_shown"] == 16
    grid = Image.open(io.BytesIO(base64.b64decode(doc["png"])))
    assert grid.mode == "L" and grid.size == (4 * 65 + 1, 4 * 65 + 1)
    deeper = trained_server.client.post(f"/v1/features?layer={doc['layers'][-1]}", content=body)
    assert deeper.json()["output_size"] == [8, 8]
    png = trained_server.client.post("/v1/features", content=body, headers={"Accept": "image/png"})
    assert png.headers["x-kernel-size"] == "3x3" and png.headers["x-output-size"] == "64x64"
    assert trained_server.client.post("/v1/features?layer=nope", content=body).status_code == 422


def test_explanations_beyond_the_queue_limit_get_503_and_predictions_still_answer(
    trained_server: LiveServer,
) -> None:
    import concurrent.futures
    import threading

    import httpx

    body = png_bytes(shape_in_quadrant("star", 1, seed=4))
    start = threading.Barrier(12)

    def one(_: int) -> int:
        with httpx.Client(base_url=trained_server.url, timeout=60) as c:
            c.get("/healthz")  # connected before the barrier: the 12 posts then land together
            start.wait()
            return c.post("/v1/explain", content=body).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(12)))
        assert trained_server.client.post("/v1/predict", content=body).status_code == 200
    assert set(codes) <= {200, 503} and 200 in codes
    assert 503 in codes, codes  # limit 2, concurrency 1: 12 at once must overflow
    assert trained_server.metrics()['convserve_explanation_rejected_total{reason="overloaded"}'] >= 1
