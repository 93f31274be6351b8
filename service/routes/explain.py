"""POST /v1/explain (Grad-CAM) and POST /v1/features (feature maps): one image, the /v1/predict inputs.

The body is parsed with the predict path's own functions (service/inputs.py), decoded with
service/decode.py on an explain thread, and computed by service/explain.py on its own bounded queue.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import Response

from model.checkpoint import CheckpointError
from service.errors import ImageError
from service.explain import Explained, Explainer, ExplainOverloaded, ExplainTimeout, LayerNotFound, b64
from service.heatmaps import upsample
from service.http_errors import ServiceError
from service.inputs import Upload, parse_body, read_body
from service.predictor import Predictor
from service.routes.openapi import EXPLAIN_RESPONSES, FEATURES_RESPONSES, IMAGE_BODY
from service.state import get_state

router = APIRouter(tags=["explain"])
RETRY = {"Retry-After": "1"}


def explainer(request: Request) -> Explainer:
    e: Explainer = request.app.state.explainer
    return e


async def _one_upload(request: Request, kind: str) -> tuple[Predictor, Upload]:
    st = get_state(request)
    s = st.settings
    ex = explainer(request)
    try:
        body = await read_body(request, s.max_upload_bytes)
        parsed = parse_body(body, request.headers.get("content-type"), 1)
        entry = parsed.entries[0]
        if isinstance(entry, ImageError):
            raise entry
    except ImageError:
        ex.metrics.rejected.labels("bad_input").inc()
        ex.metrics.requests.labels(kind, "bad_input").inc()
        raise
    if st.draining or ex.closed:
        ex.metrics.rejected.labels("shutting_down").inc()
        raise ServiceError("shutting_down", "the server is shutting down", headers=RETRY)
    if not st.ready:
        ex.metrics.rejected.labels("not_ready").inc()
        raise ServiceError("not_ready", "the model is still warming up; retry shortly", headers=RETRY)
    return st.predictor, entry


async def _run(request: Request, kind: str, fn: Any, *args: Any) -> Any:
    ex = explainer(request)
    try:
        out = await ex.submit(kind, fn, *args)
    except ExplainOverloaded as e:
        ex.metrics.requests.labels(kind, "overloaded").inc()
        message = f"explanations are busy: {e}; retry shortly"
        raise ServiceError("overloaded", message, headers=RETRY) from None
    except ExplainTimeout as e:
        ex.metrics.requests.labels(kind, "timeout").inc()
        raise ServiceError("timeout", str(e)) from None
    except ImageError:
        ex.metrics.rejected.labels("bad_input").inc()
        ex.metrics.requests.labels(kind, "bad_input").inc()
        raise
    except LayerNotFound as e:
        ex.metrics.requests.labels(kind, "bad_input").inc()
        raise ServiceError("invalid_parameter", str(e)) from None
    except CheckpointError as e:
        ex.metrics.requests.labels(kind, "error").inc()
        raise ServiceError("internal_error", str(e)) from None
    ex.metrics.requests.labels(kind, "ok").inc()
    return out


def _target(value: str | None, labels: list[str]) -> int | None:
    if value is None or value == "":
        return None
    if value in labels:
        return labels.index(value)
    if value.lstrip("-").isdigit():
        i = int(value)
        if 0 <= i < len(labels):
            return i
        raise ServiceError("invalid_parameter", f"target: index {i} is outside 0..{len(labels) - 1}")
    message = f"target: {value!r} is neither a label nor an index; labels: {labels}"
    raise ServiceError("invalid_parameter", message)


def _json(obj: dict[str, Any]) -> Response:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, media_type="application/json")


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


@router.post(
    "/v1/explain",
    summary="Grad-CAM: where the model looked for a class",
    openapi_extra=IMAGE_BODY,
    responses=EXPLAIN_RESPONSES,
    response_class=Response,
)
async def explain(
    request: Request,
    target: Annotated[
        str | None, Query(description="a label or class index (default: the top-1 class)")
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="predictions returned")] = None,
) -> Response:
    predictor, upload = await _one_upload(request, "gradcam")
    labels = predictor.labels
    index = _target(target, labels)
    ex = explainer(request)
    out: Explained = await _run(
        request, "gradcam", ex.explain, predictor, upload.data, upload.content_type, index
    )
    if _wants_png(request):
        return Response(out.overlay_png, media_type="image/png",
                        headers={"X-Target": labels[out.target], "X-Layer": out.layer})
    k = min(top_k or get_state(request).settings.default_top_k, len(labels))
    ps, idx = out.probs.topk(k)
    grid = upsample(out.cam, 16, 16)
    return _json({
        "model": predictor.model_ref(),
        "predictions": [
            {"label": labels[i], "index": i, "probability": p}
            for p, i in zip(ps.tolist(), idx.tolist(), strict=True)
        ],
        "target": {"label": labels[out.target], "index": out.target,
                   "probability": float(out.probs[out.target])},
        "layer": out.layer,
        "heatmap": {
            "grid": [[round(float(v), 4) for v in row] for row in grid],
            "layer_size": list(out.cam.shape),
        },
        "heatmap_png": b64(out.heatmap_png),
        "overlay_png": b64(out.overlay_png),
        "input_png": b64(out.input_png),
        "input_size": list(predictor.input_shape[1:]),
        "timing_ms": {"explain": round(out.seconds * 1000, 3)},
    })


@router.post(
    "/v1/features",
    summary="Feature maps of a convolution (default: the first)",
    openapi_extra=IMAGE_BODY,
    responses=FEATURES_RESPONSES,
    response_class=Response,
)
async def features(
    request: Request,
    layer: Annotated[str | None, Query(description="a Conv2d module path (the answer lists them)")] = None,
) -> Response:
    predictor, upload = await _one_upload(request, "features")
    ex = explainer(request)
    out: dict[str, Any] = await _run(request, "features", ex.features, predictor, upload.data,
                                     upload.content_type, layer)
    png = out.pop("png")
    if _wants_png(request):
        headers = {
            "X-Layer": out["layer"],
            "X-Kernel-Size": "x".join(map(str, out["kernel_size"])),
            "X-Stride": ",".join(map(str, out["stride"])),
            "X-Padding": pad if isinstance(pad := out["padding"], str) else ",".join(map(str, pad)),
            "X-Output-Size": "x".join(map(str, out["output_size"])),
        }
        return Response(png, media_type="image/png", headers=headers)
    return _json({"model": predictor.model_ref(), **out, "png": b64(png)})
