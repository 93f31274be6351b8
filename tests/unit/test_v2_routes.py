"""The /v2 infer routes' registration: tried right after /v1's (route order is per-request cost) and
documented with their path parameters, which the handler reads from the scope instead of declaring."""

from __future__ import annotations

from pathlib import Path

from service.app import create_app
from service.settings import Settings

INFER = "/v2/models/{name}/infer"
INFER_VERSIONED = "/v2/models/{name}/versions/{model_version}/infer"


def _spec(tiny_checkpoint: Path) -> dict:  # type: ignore[type-arg]
    return create_app(Settings(checkpoint=tiny_checkpoint)).openapi()  # routes only: no lifespan


def test_inference_routes_come_first(tiny_checkpoint: Path) -> None:
    # OpenAPI paths follow the order FastAPI matches routes in.
    assert list(_spec(tiny_checkpoint)["paths"])[:3] == ["/v1/predict", INFER, INFER_VERSIONED]


def test_infer_path_parameters_are_documented(tiny_checkpoint: Path) -> None:
    paths = _spec(tiny_checkpoint)["paths"]
    for path, names in ((INFER, ["name"]), (INFER_VERSIONED, ["name", "model_version"])):
        params = paths[path]["post"]["parameters"]
        assert [p["name"] for p in params if p["in"] == "path"] == names
        assert all(p["required"] for p in params if p["in"] == "path")
        assert not [p for p in params if p["in"] == "query"]  # no stray ?model_version
        assert "Inference-Header-Content-Length" in {p["name"] for p in params if p["in"] == "header"}
