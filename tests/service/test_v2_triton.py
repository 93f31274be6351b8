"""/v2 with the real tritonclient.http client against a live uvicorn server, compared with /v1."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from model.preprocess import Preprocess
from service.decode import decode_to_tensor
from tests import images
from tests.conftest import TINY_LABELS, LiveServer
from tests.service.helpers import rejected

MODEL = "tiny"


@pytest.fixture(scope="module")
def client(server: LiveServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")


def _v1_probs(server: LiveServer, data: bytes) -> np.ndarray:
    r = server.client.post("/v1/predict?probabilities=all", content=data)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["probabilities"], dtype=np.float32)


def _pictures() -> list[bytes]:
    return [images.jpeg(), images.png("RGB"), images.jpeg((40, 70)), images.png("L")]


def _bytes_input(files: list[bytes], binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput("image", [len(files)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    else:  # JSON cannot carry raw bytes: base64 text (this tritonclient cannot set the marker)
        text = np.array([base64.b64encode(f).decode() for f in files], dtype=np.object_)
        inp.set_data_from_numpy(text, binary_data=False)
    return inp


def test_plain_json_with_the_base64_marker(server: LiveServer) -> None:
    """What curl or MLServer's client sends: JSON, content_type=base64, no binary extension."""
    files = _pictures()[:2]
    body = {
        "id": "curl",
        "inputs": [
            {
                "name": "image",
                "shape": [2, 1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [[base64.b64encode(f).decode()] for f in files],
            }
        ],
    }
    r = server.client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [2, 6]
    rows = np.asarray(out["data"], dtype=np.float32).reshape(2, 6)
    for row, f in zip(rows, files, strict=True):
        np.testing.assert_allclose(row, _v1_probs(server, f), atol=1e-5)


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "2")
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"] and model["platform"] == "pytorch"
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in model["inputs"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in model["inputs"]
    classes = len(TINY_LABELS)
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}]
    assert client.get_model_metadata(MODEL, "1") == model
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("n", [1, 4])
def test_infer_equals_v1(
    server: LiveServer, client: httpclient.InferenceServerClient, binary: bool, n: int
) -> None:
    files = _pictures()[:n]
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(MODEL, [_bytes_input(files, binary)], outputs=[out], request_id="r1")
    probs = result.as_numpy("probabilities")
    assert probs is not None and probs.shape == (n, len(TINY_LABELS)) and probs.dtype == np.float32
    for row, f in zip(probs, files, strict=True):
        np.testing.assert_allclose(row, _v1_probs(server, f), atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1" and response["id"] == "r1"


def test_outputs_omitted_returns_all(server: LiveServer, client: httpclient.InferenceServerClient) -> None:
    result = client.infer(MODEL, [_bytes_input(_pictures()[:2], True)])
    probs = result.as_numpy("probabilities")
    assert probs is not None and probs.shape == (2, len(TINY_LABELS))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(
    server: LiveServer, client: httpclient.InferenceServerClient, binary: bool
) -> None:
    files = _pictures()
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = client.infer(MODEL, [_bytes_input(files, binary)], outputs=[out])
    classes = result.as_numpy("probabilities")
    assert classes is not None and classes.shape == (4, 3)
    for row, f in zip(classes, files, strict=True):
        v1 = _v1_probs(server, f)
        parsed = [(x.decode() if isinstance(x, bytes) else x).split(":") for x in row]
        indices = [int(i) for _, i, _ in parsed]
        assert indices == list(np.argsort(-v1, kind="stable")[:3])
        for score, index, label in parsed:
            assert label == TINY_LABELS[int(index)]
            assert float(score) == pytest.approx(float(v1[int(index)]), abs=1e-5)


def test_fp32_tensor_input(server: LiveServer, client: httpclient.InferenceServerClient) -> None:
    pre = Preprocess.from_dict(server.client.get("/v1/model").json()["preprocessing"])
    files = _pictures()[:2]
    batch = np.stack([pre.normalize(decode_to_tensor(f, pre, 10**7, None)).numpy() for f in files])
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch.astype(np.float32), binary_data=binary)
        probs = client.infer(MODEL, [inp]).as_numpy("probabilities")
        assert probs is not None
        for row, f in zip(probs, files, strict=True):
            np.testing.assert_allclose(row, _v1_probs(server, f), atol=1e-5)


def test_errors(server: LiveServer, client: httpclient.InferenceServerClient) -> None:
    before = rejected(server, "corrupt_image", "v2")
    files = [images.jpeg(), b"not an image at all", images.jpeg()]
    with pytest.raises(InferenceServerException, match="element 1 of the input") as e:
        client.infer(MODEL, [_bytes_input(files, True)])
    assert e.value.status() == "400"
    assert rejected(server, "corrupt_image", "v2") == before + 1
    with pytest.raises(InferenceServerException, match="unknown model") as e:
        client.infer("nope", [_bytes_input(files[:1], True)])
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no version") as e:
        client.infer(MODEL, [_bytes_input(files[:1], True)], model_version="7")
    assert e.value.status() == "404"
    versioned = client.infer(MODEL, [_bytes_input(files[:1], True)], model_version="1")
    assert versioned.get_response()["model_version"] == "1"  # .../versions/1/infer: the path's version
    wrong_type = httpclient.InferInput("input", [1, 3, 32, 32], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.int32))
    bad_before = rejected(server, "bad_request", "v2")
    with pytest.raises(InferenceServerException, match="FP32 \\[N, 3, 32, 32\\]") as e:
        client.infer(MODEL, [wrong_type])
    assert e.value.status() == "400"
    wrong_shape = httpclient.InferInput("input", [1, 3, 16, 16], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="shape \\[N, 3, 32, 32\\]") as e:
        client.infer(MODEL, [wrong_shape])
    assert e.value.status() == "400"
    assert rejected(server, "bad_request", "v2") == bad_before + 2
    assert client.is_server_ready()  # and the service keeps serving


def test_v2_metrics_are_labelled(server: LiveServer, client: httpclient.InferenceServerClient) -> None:
    client.infer(MODEL, [_bytes_input(_pictures()[:1], True)])
    m = server.metrics()
    assert m['convserve_requests_total{code="200",endpoint="/v2/models/{name}/infer"}'] >= 1
    assert 'convserve_rejected_images_total{protocol="v2",reason="overloaded"}' in m
    assert 'convserve_rejected_images_total{protocol="v1",reason="overloaded"}' in m
