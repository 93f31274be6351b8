"""schemathesis against a live `python -m service`: every operation of its own /openapi.json, fed
generated requests (valid and invalid by the document), must answer without a 5xx and as documented:
a documented status code, a documented Content-Type and a body that matches the documented schema.

One pytest item per operation, so `--hypothesis-show-statistics` prints each one's example count.
(schemathesis's own `schema.parametrize()` runs them as subtests of one item, and in 4.32 it fails
under pytest 9.2: it reads `Function._nodeid`, which pytest removed. `APIOperation.as_strategy` is
its public building block for plain hypothesis tests.)
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests import images
from tests.conftest import LiveServer, make_checkpoint, run_server

ADMIN_KEY = "schemathesis-admin-key"
MODEL = "tiny"  # make_checkpoint's name and version: /v2 paths that name it reach the model
VERSION = "1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Bounded: 30 examples an operation (18 operations, 24-50 s on 2 shared cores). No hypothesis
# deadline: a per-example time limit is a timed assertion on a shared machine; pytest-timeout and
# the per-request timeout below bound the time instead.
EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# Every operation of the document (test_the_list_covers_the_document keeps this complete).
OPERATIONS = [
    ("POST", "/v1/predict"),
    ("POST", "/v1/explain"),
    ("POST", "/v1/features"),
    ("GET", "/v1/model"),
    ("GET", "/v1/model/samples.png"),
    ("POST", "/v1/model/reload"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/{model_version}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{model_version}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{model_version}/infer"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Its own run folder with a samples.png, so /v1/model/samples.png answers 200 (an image) too.
    run = tmp_path_factory.mktemp("schema-run")
    checkpoint = make_checkpoint(run / "model.safetensors", name=MODEL, version=VERSION)
    (run / "samples.png").write_bytes(images.png("RGB"))
    with run_server(checkpoint, tmp_path_factory.mktemp("schema"), cli=True, admin_api_key=ADMIN_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def api(server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def _valid_requests(path: str) -> list[dict[str, object]]:
    """Requests that succeed, so the 200 answers are checked against their schema too: generated
    bytes are almost never an image, and a random model name is never the served one."""
    jpeg = images.jpeg()
    v2_body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(jpeg).decode()],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    names = {"name": MODEL, "model_version": VERSION}
    if path == "/v1/predict":
        return [{"body": jpeg, "media_type": "image/jpeg"}]
    if path in ("/v1/explain", "/v1/features"):  # the JSON answer and the PNG one
        raw = {"body": jpeg, "media_type": "application/octet-stream"}
        return [raw, {**raw, "headers": {"Accept": "image/png"}}]
    if path.endswith("/infer"):
        return [{"path_parameters": names, "body": v2_body, "media_type": "application/json"}]
    if path.startswith("/v2/models/"):
        return [{"path_parameters": names}]
    return []


_STRATEGIES: dict[tuple[int, str, str], st.SearchStrategy[schemathesis.Case]] = {}


def _cases(api: schemathesis.BaseSchema, method: str, path: str) -> st.SearchStrategy[schemathesis.Case]:
    key = (id(api), method, path)
    if key not in _STRATEGIES:
        operation = api[path][method]
        strategies = [operation.as_strategy(mode) for mode in GenerationMode]  # positive and negative
        if path.startswith("/v2/models/"):  # generated parts of the request, the real model's name
            names = {"name": MODEL, "model_version": VERSION}
            strategies.append(operation.as_strategy(path_parameters=names))
        strategies += [operation.as_strategy(**kw) for kw in _valid_requests(path)]  # type: ignore[arg-type]
        _STRATEGIES[key] = st.one_of(strategies)
    return _STRATEGIES[key]


def test_the_list_covers_the_document(api: schemathesis.BaseSchema) -> None:
    live = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert live == set(OPERATIONS)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
@EXAMPLES
@given(data=st.data())
def test_every_operation_answers_as_documented(
    api: schemathesis.BaseSchema, method: str, path: str, data: st.DataObject
) -> None:
    case = data.draw(_cases(api, method, path), label="case")
    if path == "/v1/model/reload" and data.draw(st.booleans(), label="admin key"):
        # Half the reloads authenticate, so the body is parsed and a reload attempted (a missing
        # path is refused with the old model still serving; an empty body reloads the same tiny
        # checkpoint); the rest exercise 401/403 with whatever X-API-Key was generated.
        case.headers = {**(case.headers or {}), "X-API-Key": ADMIN_KEY}
    response = case.call_and_validate(checks=CHECKS, timeout=60)
    # In the statistics' Events: what share of the examples got which answer.
    event(f"{response.status_code} {response.headers.get('content-type', ['-'])[0].split(';')[0]}")


def test_the_server_survived(server: LiveServer) -> None:
    """Whatever it was sent, it still serves, and nothing was caught only by the last-resort handler."""
    assert server.client.get("/readyz").status_code == 200
    assert "Traceback" not in server.log_text(), server.log_text()[-4000:]
