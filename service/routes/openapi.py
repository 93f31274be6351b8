"""The OpenAPI document's request bodies and responses, in one place; the routes only name them.

Most bodies are read raw (no pydantic models on the hot path), so FastAPI cannot infer them: they are
described here, as are the error answers, which FastAPI would otherwise document as its own
`HTTPValidationError` (`{"detail": [...]}`) although handlers.py answers `{"error": {...}}`, or under
/v2 `{"error": "message"}`. tests/http/test_schema.py holds the live service to this document.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PNG = {"image/png": _BINARY}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _json(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"application/json": {"schema": schema, **extra}}


# ---- error answers ----

ERROR = _obj(
    ["error"],
    error=_obj(
        ["code", "message"],
        code={**_STR, "description": "stable code (README: error codes)"},
        message=_STR,
        index={**_INT, "description": "the failing image's position, in a multi-image request"},
        request_id=_STR,
    ),
)
V2_ERROR = _obj(["error"], error={**_STR, "description": "the message (the protocol's error shape)"})


def errors(descriptions: dict[int, str], *, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """Error responses, status -> description, all with the JSON error body of their protocol."""
    content = _json(V2_ERROR if v2 else ERROR)
    return {status: {"description": text, "content": content} for status, text in descriptions.items()}


_BAD_PARAMETER = "A query or header parameter is malformed or out of range (`invalid_parameter`)"
_BUSY = "Queue full, warming up, draining, or the device failed (`overloaded`, `not_ready`, `shutting_down`, "
_BUSY += "`device_failed`; see Retry-After)"
_IMAGE_ERRORS = {
    400: "Bad image or request (`empty_body`, `corrupt_image`, `missing_file`, `bad_base64`, `bad_request`)",
    413: "Too large: the body or the image's pixels (`payload_too_large`, `too_many_pixels`)",
    415: "Not a supported image format, or a non-image Content-Type (`unsupported_media_type`)",
    422: _BAD_PARAMETER,
}

# ---- shared parts of the answers ----

_MODEL_REF = _obj(["name", "version", "sha256"], name=_STR, version=_STR, sha256=_STR)
_PREDICTION = _obj(["label", "index", "probability"], label=_STR, index=_INT, probability=_NUM)
_TIMING = {"type": "object", "additionalProperties": _NUM, "description": "milliseconds per stage"}
_PROBABILITIES = {**_array(_NUM), "description": "with `probabilities=all`: the softmax, by class index"}

# ---- /v1/predict ----

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
                    "properties": {"file": _array({"type": "string", "format": "binary"})},
                }
            },
            "application/json": {
                "schema": _obj(["images"], images=_array({"type": "string", "format": "byte"})),
                "example": {"images": ["iVBORw0KGgoAAAANSUhEUgAA…"]},
            },
        },
    }
}
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
_ONE = _obj(
    ["model", "predictions", "timing_ms"],
    model=_MODEL_REF,
    predictions=_array(_PREDICTION),
    probabilities=_PROBABILITIES,
    timing_ms=_TIMING,
)
_RESULT = {
    "oneOf": [
        _obj(
            ["index", "predictions"],
            index=_INT,
            predictions=_array(_PREDICTION),
            probabilities=_PROBABILITIES,
        ),
        _obj(["index", "error"], index=_INT, error=ERROR["properties"]["error"]),
    ]
}
_SEVERAL = _obj(
    ["model", "results", "timing_ms"], model=_MODEL_REF, results=_array(_RESULT), timing_ms=_TIMING
)
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Predictions: one image -> `predictions`; several -> `results` in input order",
        "content": _json(
            {"oneOf": [_ONE, _SEVERAL]},
            examples={
                "one image": {"value": _PREDICTION_EXAMPLE},
                "several images": {"value": _MULTI_EXAMPLE},
            },
        ),
    },
    **errors(
        {
            **_IMAGE_ERRORS,
            500: "The model failed on the batch, or gave NaN/inf for the image (`internal_error`)",
            503: _BUSY,
            504: "Timed out (`timeout`)",
        }
    ),
}

# ---- /v1/explain and /v1/features ----

IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image, as for /v1/predict: raw body, a multipart file, or JSON base64.",
        "content": {
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/json": {"schema": {"type": "object", "properties": {"images": _array(_STR)}}},
        },
    }
}
_EXPLAIN_ERRORS = {
    **_IMAGE_ERRORS,
    422: _BAD_PARAMETER + "; or `target`/`layer` names no class or convolution",
    500: "The model could not be explained (`internal_error`)",
    503: "Explanations busy, warming up or draining (`overloaded`, `not_ready`, `shutting_down`; see "
    "Retry-After)",
    504: "Timed out (`timeout`)",
}
_B64_PNG = {**_STR, "description": "a PNG, base64"}
_EXPLAINED = _obj(
    ["model", "predictions", "target", "layer", "heatmap", "overlay_png", "input_size", "timing_ms"],
    model=_MODEL_REF,
    predictions=_array(_PREDICTION),
    target=_PREDICTION,
    layer=_STR,
    heatmap=_obj(["grid", "layer_size"], grid=_array(_array(_NUM)), layer_size=_array(_INT)),
    heatmap_png=_B64_PNG,
    overlay_png=_B64_PNG,
    input_png=_B64_PNG,
    input_size=_array(_INT),
    timing_ms=_TIMING,
)


def _json_or_png(schema: dict[str, Any], description: str) -> dict[int | str, dict[str, Any]]:
    """An explain route's answers: `schema` as JSON or, with `Accept: image/png`, the PNG itself."""
    ok = {"description": description, "content": {**_json(schema), **_PNG}}
    return {200: ok, **errors(_EXPLAIN_ERRORS)}


EXPLAIN_RESPONSES = _json_or_png(
    _EXPLAINED,
    "The Grad-CAM heatmap as JSON; with `Accept: image/png`, the overlay itself (the class and layer "
    "in X-Target and X-Layer)",
)
_FEATURES = _obj(
    ["model", "layer", "layers", "kernel_size", "stride", "padding", "output_size", "png"],
    model=_MODEL_REF,
    layer=_STR,
    layers=_array(_STR),
    kernel_size=_array(_INT),
    stride=_array(_INT),
    padding={"oneOf": [_STR, _array(_INT)]},
    in_channels=_INT,
    out_channels=_INT,
    input_size=_array(_INT),
    output_size=_array(_INT),
    channels_shown=_INT,
    columns=_INT,
    png=_B64_PNG,
    ms=_NUM,
)
FEATURES_RESPONSES = _json_or_png(
    _FEATURES,
    "The feature maps as a PNG grid in JSON; with `Accept: image/png`, the PNG itself (the layer's "
    "geometry in X-Layer, X-Kernel-Size, X-Stride, X-Padding, X-Output-Size)",
)

# ---- /v1/model, its samples, the reload ----

MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The served model",
        "content": _json(
            _obj(
                ["name", "version", "classes", "checkpoint", "serving"],
                name=_STR,
                version=_STR,
                classes=_array(_STR),
                parameters={"type": ["integer", "null"]},
                samples_png={"type": ["string", "null"]},
            )
        ),
    }
}
SAMPLES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The PNG", "content": _PNG},
    **errors({404: "No samples.png beside the checkpoint (`not_found`)"}),
}
RELOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "Optional; without a body the configured checkpoint path is reloaded.",
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"checkpoint": _STR}},
                "example": {"checkpoint": "runs/v2/model.safetensors"},
            }
        },
    }
}
RELOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Swapped in",
        "content": _json(
            _obj(
                ["model", "previous", "checkpoint", "reload_ms"],
                model=_MODEL_REF,
                previous=_MODEL_REF,
                checkpoint=_STR,
                reload_ms=_NUM,
            )
        ),
    },
    **errors(
        {
            400: "Malformed body, or a checkpoint that cannot be loaded or run (`bad_request`, "
            "`invalid_checkpoint`, `unsupported_precision`); the old model keeps serving",
            401: "No X-API-Key (`unauthorized`)",
            403: "Wrong X-API-Key, or reload disabled (`forbidden`, `reload_disabled`)",
            409: "Another reload is running (`reload_in_progress`)",
            413: "The body is over 64 KiB (`payload_too_large`)",
            422: _BAD_PARAMETER,
            503: "Still warming up (`not_ready`)",
        }
    ),
}

# ---- operations ----

_UNHEALTHY = (
    "The warm-up failed or the device failed: replace this process (`warmup_failed`, `device_failed`)"
)
HEALTHZ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Live", "content": _json(_obj(["status"], status={"const": "ok"}))},
    **errors({503: _UNHEALTHY}),
}
READYZ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Ready",
        "content": _json(_obj(["status", "model"], status={"const": "ready"}, model=_MODEL_REF)),
    },
    **errors(
        {
            503: "Not ready: warming up, draining, or failed (`not_ready`, `shutting_down`, `warmup_failed`, "
            "`device_failed`)"
        }
    ),
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": _STR}}}
}

# ---- /v2 (the Open Inference Protocol) ----

V2_SERVER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server metadata",
        "content": _json(
            _obj(["name", "version", "extensions"], name=_STR, version=_STR, extensions=_array(_STR))
        ),
    }
}
V2_LIVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Live", "content": _json(_obj(["live"], live={"const": True}))},
    **errors({503: _UNHEALTHY}, v2=True),
}
V2_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready", "content": _json(_obj(["ready"], ready={"const": True}))},
    **errors({503: "Not ready: warming up, draining, or failed"}, v2=True),
}
_V2_UNKNOWN = {404: "Unknown model or version", 422: _BAD_PARAMETER}
_V2_TENSOR_META = _obj(["name", "datatype", "shape"], name=_STR, datatype=_STR, shape=_array(_INT))
V2_MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Model metadata",
        "content": _json(
            _obj(
                ["name", "versions", "platform", "inputs", "outputs"],
                name=_STR,
                versions=_array(_STR),
                platform=_STR,
                inputs=_array(_V2_TENSOR_META),
                outputs=_array(_V2_TENSOR_META),
            )
        ),
    },
    **errors(_V2_UNKNOWN, v2=True),
}
V2_MODEL_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Ready",
        "content": _json(_obj(["name", "ready"], name=_STR, ready={"const": True})),
    },
    **errors({**_V2_UNKNOWN, 503: "Not ready: warming up, draining, or failed"}, v2=True),
}

_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": _STR,
        "shape": _array({**_INT, "minimum": 0}),
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
                        "id": _STR,
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _V2_TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": _array(
                            {"type": "object", "properties": {"name": _STR, "parameters": {"type": "object"}}}
                        ),
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


_V2_OUTPUT = _obj(
    ["name", "datatype", "shape"],
    name=_STR,
    datatype={"type": "string", "enum": ["BYTES", "FP32"]},
    shape=_array(_INT),
    parameters={"type": "object"},
    data={"type": "array", "description": '"probability:index:label" strings (classification) or numbers'},
)
V2_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The inference response (JSON; with binary outputs the JSON header, then the tensor "
        "bytes, its length in the Inference-Header-Content-Length response header)",
        "content": {
            **_json(
                _obj(
                    ["model_name", "model_version", "outputs"],
                    model_name=_STR,
                    model_version=_STR,
                    id=_STR,
                    outputs=_array(_V2_OUTPUT),
                )
            ),
            "application/octet-stream": _BINARY,
        },
    },
    **errors(
        {
            400: "Malformed request, wrong datatype or shape, or a bad image (named)",
            404: "Unknown model or version",
            413: "Too large",
            415: "An element is not a supported image format",
            422: _BAD_PARAMETER,
            500: "The model failed on the batch, or gave NaN/inf",
            503: "Warming up, overloaded or draining (see Retry-After)",
            504: "Timed out",
        },
        v2=True,
    ),
}
