"""POST /v1/predict and friends against a real uvicorn process (the session's `server`)."""

from __future__ import annotations

import base64
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests import images
from tests.conftest import TINY_LABELS, LiveServer
from tests.service.helpers import check_predictions, same
from tests.tooling import require_tool


# ---- input forms ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "make"),
    [
        ("image/jpeg", images.jpeg),
        ("image/png", lambda: images.png("RGBA")),
        ("image/webp", images.webp),
        ("image/bmp", images.bmp),
        ("image/gif", images.gif),
        ("image/tiff", images.tiff),
        ("application/octet-stream", images.jpeg),
    ],
)
def test_raw_body(server: LiveServer, content_type: str, make: object) -> None:
    r = server.client.post("/v1/predict", content=make(), headers={"Content-Type": content_type})  # type: ignore[operator]
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "predictions", "timing_ms"}
    assert set(body["model"]) == {"name", "version", "sha256"} and len(body["model"]["sha256"]) == 64
    check_predictions(body["predictions"], 3)  # default_top_k
    assert {"decode", "queue", "inference", "total"} <= set(body["timing_ms"])


def test_multipart_one_file_answers_like_one_image(server: LiveServer) -> None:
    r = server.client.post("/v1/predict", files={"file": ("a.jpg", images.jpeg(), "image/jpeg")})
    assert r.status_code == 200, r.text
    check_predictions(r.json()["predictions"], 3)


def test_multipart_many_files_keep_input_order(server: LiveServer) -> None:
    jpg, png = images.jpeg(), images.png("L")
    files = [
        ("file", ("a.jpg", jpg, "image/jpeg")),
        ("file", ("b.png", png, "image/png")),
        ("other", ("c.jpg", jpg, "image/jpeg")),
    ]
    r = server.client.post(
        "/v1/predict", files=files, data={"note": "form fields are ignored"}, params={"top_k": 2}
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    for x in results:
        check_predictions(x["predictions"], 2)
    assert same(results[0]["predictions"], results[2]["predictions"])  # same bytes, same answer


def test_json_base64(server: LiveServer) -> None:
    jpg = base64.b64encode(images.jpeg()).decode()
    one = server.client.post("/v1/predict", json={"images": [jpg]})
    assert one.status_code == 200, one.text
    many = server.client.post("/v1/predict", json={"images": [jpg, "data:image/jpeg;base64," + jpg]})
    assert many.status_code == 200, many.text
    results = many.json()["results"]
    assert same(results[0]["predictions"], results[1]["predictions"])
    assert same(results[0]["predictions"], one.json()["predictions"])


def test_same_image_same_answer_across_forms(server: LiveServer) -> None:
    jpg = images.jpeg()
    raw = server.client.post("/v1/predict", content=jpg, headers={"Content-Type": "image/jpeg"}).json()
    part = server.client.post("/v1/predict", files={"f": ("a.jpg", jpg, "image/jpeg")}).json()
    b64 = server.client.post("/v1/predict", json={"images": [base64.b64encode(jpg).decode()]}).json()
    assert same(raw["predictions"], part["predictions"]) and same(raw["predictions"], b64["predictions"])


# ---- query parameters ------------------------------------------------------------------------------
def test_top_k_is_clamped_to_the_class_count(server: LiveServer) -> None:
    r = server.client.post("/v1/predict", params={"top_k": 1000}, content=images.jpeg())
    assert r.status_code == 200
    check_predictions(r.json()["predictions"], len(TINY_LABELS))


@pytest.mark.parametrize("value", ["0", "1001", "-3", "many"])
def test_top_k_out_of_range_is_422_in_the_error_shape(server: LiveServer, value: str) -> None:
    r = server.client.post("/v1/predict", params={"top_k": value}, content=images.jpeg())
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_parameter" and "top_k" in err["message"]
    assert r.headers["x-request-id"] == err["request_id"]


def test_probabilities_all(server: LiveServer) -> None:
    r = server.client.post("/v1/predict", params={"probabilities": "all", "top_k": 1}, content=images.jpeg())
    body = r.json()
    assert len(body["probabilities"]) == len(TINY_LABELS)
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    top = body["predictions"][0]
    assert body["probabilities"][top["index"]] == pytest.approx(top["probability"])


# ---- batching, metrics, other endpoints -------------------------------------------------------------
def test_concurrent_requests_are_batched(server: LiveServer) -> None:
    jpg = images.jpeg()

    def one(_: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/predict", content=jpg, headers={"Content-Type": "image/jpeg"}).status_code

    for _ in range(10):  # bursts until the metrics show a batch > 1 (no timing assumption)
        with ThreadPoolExecutor(24) as pool:
            assert set(pool.map(one, range(48))) == {200}
        m = server.metrics()
        if m['convserve_batch_size_bucket{le="1.0"}'] < m["convserve_batch_size_count"]:
            break
    else:
        pytest.fail("48 concurrent requests x 10 never formed a batch larger than one")
    assert m['convserve_requests_total{code="200",endpoint="/v1/predict"}'] >= 48
    assert m["convserve_in_flight_requests"] == 0
    assert m["convserve_queue_depth"] == 0
    assert sum(v for k, v in m.items() if k.startswith("convserve_predictions_total")) >= 48


def test_metrics_pass_promtool(server: LiveServer) -> None:
    promtool = require_tool("promtool")
    server.client.post("/v1/predict", content=images.jpeg())
    text = server.client.get("/metrics").text
    for name in (
        "convserve_requests_total",
        "convserve_request_duration_seconds_bucket",
        "convserve_stage_duration_seconds_bucket",
        "convserve_batch_size_bucket",
        "convserve_queue_depth",
        "convserve_queue_limit",
        "convserve_in_flight_requests",
        "convserve_rejected_images_total",
        "convserve_predictions_total",
        "convserve_top1_confidence_bucket",
        "convserve_model_info",
        "convserve_ready",
        "process_resident_memory_bytes",
    ):
        assert name in text, name
    for stage in ("decode", "queue", "inference", "response"):
        assert f'convserve_stage_duration_seconds_count{{stage="{stage}"}}' in text
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def test_model_health_ready_docs(server: LiveServer) -> None:
    c = server.client
    model = c.get("/v1/model").json()
    assert model["classes"] == TINY_LABELS and model["architecture"] == "convnet"
    assert model["device"] == "cpu" and model["precision"] == "fp32"
    assert model["input_size"] == {"channels": 3, "height": 32, "width": 32}
    assert len(model["checkpoint"]["sha256"]) == 64 and model["preprocessing"]["size"] == 32
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    assert c.get("/docs").status_code == 200
    spec = c.get("/openapi.json").json()
    content = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "multipart/form-data", "application/json"} <= set(content)
    missing = c.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert c.get("/v1/predict").json()["error"]["code"] == "method_not_allowed"
    m = server.metrics()
    info = (
        'convserve_model_info{architecture="convnet",device="cpu",name="tiny",precision="fp32",version="1"}'
    )
    assert m[info] == 1
    assert m["convserve_ready"] == 1


def test_request_id_generated_when_absent_and_cors(server: LiveServer) -> None:
    r = server.client.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32
    pre = server.client.options(
        "/v1/predict", headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://example.test"
    other = server.client.options(
        "/v1/predict", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers
