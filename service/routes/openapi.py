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
