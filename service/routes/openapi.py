"""OpenAPI descriptions and examples for /docs. The predict body is read raw, so it is described here."""

from __future__ import annotations

from typing import Any

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PREDICTION_EXAMPLE = {
    "model": {"name": "shapes", "version": "1", "sha256": "3f1c0d…"},
    "predictions": [
        {"label": "circle", "index": 0, "probability": 0.93},
        {"label": "square", "index": 2, "probability": 0.05},
    ],
    "timing_ms": {"read": 0.05, "decode": 1.2, "queue": 0.1, "inference": 3.4, "total": 5.0},
}
_MULTI_EXAMPLE = {
    "model": {"name": "shapes", "version": "1", "sha256": "3f1c0d…"},
    "results": [
        {"index": 0, "predictions": [{"label": "circle", "index": 0, "probability": 0.93}]},
        {
            "index": 1,
            "error": {"code": "corrupt_image", "message": "the data is not a readable image", "index": 1},
        },
    ],
    "timing_ms": {"read": 0.1, "decode": 2.0, "queue": 0.2, "inference": 4.1, "total": 6.8},
}


def _error(code: str, message: str) -> dict[str, Any]:
    return {
        "application/json": {"example": {"error": {"code": code, "message": message, "request_id": "4b1e…"}}}
    }


PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, one or many multipart files, or JSON base64 images.",
        "content": {
            **{f"image/{t}": _BINARY for t in ("jpeg", "png", "webp", "bmp", "gif", "tiff")},
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}
                    },
                },
                "example": {"images": ["iVBORw0KGgoAAAANSUhEUgAA…"]},
            },
        },
    }
}

PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Predictions: one image -> `predictions`; several -> `results` in input order",
        "content": {
            "application/json": {
                "examples": {
                    "one image": {"value": _PREDICTION_EXAMPLE},
                    "several images": {"value": _MULTI_EXAMPLE},
                }
            }
        },
    },
    400: {
        "description": "Bad image or request",
        "content": _error("corrupt_image", "the data is not a readable image"),
    },
    413: {"description": "Too large", "content": _error("payload_too_large", "the body exceeds the limit")},
    415: {
        "description": "Unsupported format",
        "content": _error("unsupported_media_type", "SVG images are not supported"),
    },
    422: {
        "description": "Bad query parameter",
        "content": _error("invalid_parameter", "top_k: Input should be <= 1000"),
    },
    503: {
        "description": "Queue full, still warming up, or shutting down (`overloaded`, `not_ready`, "
        "`shutting_down`; see Retry-After)",
        "content": _error("overloaded", "the server is busy"),
    },
    504: {"description": "Timed out", "content": _error("timeout", "no answer within 30s")},
}

_V2_ERROR = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "base64 strings (BYTES) or numbers (FP32), flat or nested"},
    },
}
V2_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An Open Inference Protocol request. Plain JSON, or (binary tensor data extension) "
        "the JSON header followed by raw tensor bytes, its length in `Inference-Header-Content-Length`. "
        "Read raw: no Content-Type is required (tritonclient sends none).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _V2_TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                },
                "example": {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1],
                            "datatype": "BYTES",
                            "parameters": {"content_type": "base64"},
                            "data": ["iVBORw0KGgoAAAANSUhEUgAA…"],
                        }
                    ],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
                },
            },
            "application/octet-stream": _BINARY,
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "length of the JSON header when binary tensor data follows it",
        }
    ],
}


def v2_infer_body(*path_params: str) -> dict[str, Any]:
    """V2_INFER_BODY plus the route's path parameters: the infer handler reads them from the scope
    instead of declaring them, so FastAPI documents them only from here."""
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in path_params]
    return {**V2_INFER_BODY, "parameters": [*params, *V2_INFER_BODY["parameters"]]}


V2_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The inference response (JSON; with binary outputs the JSON header, then the tensor "
        "bytes, its length in the Inference-Header-Content-Length response header)",
        "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": _BINARY},
    },
    400: {
        "description": "Malformed request, wrong datatype or shape, or a bad image (named)",
        "content": _V2_ERROR,
    },
    404: {"description": "Unknown model or version", "content": _V2_ERROR},
    413: {"description": "Too large", "content": _V2_ERROR},
    415: {"description": "An element is not a supported image format", "content": _V2_ERROR},
    503: {"description": "Warming up, overloaded or draining (see Retry-After)", "content": _V2_ERROR},
    504: {"description": "Timed out", "content": _V2_ERROR},
}
