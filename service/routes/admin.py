"""POST /v1/model/reload: swap in a checkpoint without dropping a request (admin key required)."""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header
from starlette.requests import Request

from model.checkpoint import CheckpointError
from service.errors import ImageError
from service.http_errors import ServiceError
from service.predictor import PrecisionError
from service.routes.openapi import RELOAD_BODY, RELOAD_RESPONSES
from service.state import get_state

log = logging.getLogger(__name__)
router = APIRouter(tags=["admin"])
_MAX_BODY = 64 * 1024


def _authorise(key: str | None, given: str | None) -> None:
    if key is None:
        raise ServiceError("reload_disabled", "reload is disabled: set CONVSERVE_ADMIN_API_KEY to enable it")
    if not given:
        raise ServiceError("unauthorized", "send the admin key in the X-API-Key header")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ServiceError("forbidden", "the X-API-Key header does not match the admin key")


async def _checkpoint_path(request: Request, default: Path) -> Path:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY:
            raise ImageError("payload_too_large", f"a reload body is at most {_MAX_BODY} bytes", 413)
    if not body.strip():
        return default
    try:
        doc = json.loads(body)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integers; RecursionError
    # is a deeply nested document ("[[[[..."): all the client's doing, never a 500.
    except (ValueError, RecursionError) as e:
        raise ImageError("bad_request", f"the body is not valid JSON: {str(e)[:200]}", 400) from None
    path = doc.get("checkpoint") if isinstance(doc, dict) else None
    if path is None and isinstance(doc, dict) and not doc:
        return default
    if not isinstance(path, str) or not path:
        raise ImageError("bad_request", 'the body must be {"checkpoint": "path/to/model.safetensors"}', 400)
    return Path(path)


@router.post(
    "/v1/model/reload",
    summary="Load, validate and warm a checkpoint, then swap it in",
    openapi_extra=RELOAD_BODY,
    responses=RELOAD_RESPONSES,
)
async def reload_model(
    request: Request, x_api_key: Annotated[str | None, Header(description="the admin API key")] = None
) -> dict[str, Any]:
    st = get_state(request)
    key = st.settings.admin_api_key
    _authorise(key.get_secret_value() if key else None, x_api_key)
    path = await _checkpoint_path(request, st.settings.checkpoint)
    if not st.ready:  # the thread counts a reload warms at are chosen by the start-up warm-up
        raise ServiceError("not_ready", "the model is still warming up; reload when /readyz says ready")
    if st.reload_lock.locked():
        raise ServiceError("reload_in_progress", "another reload is running")
    start = time.perf_counter()
    try:
        old, new = await st.reload(path)
    except PrecisionError as e:
        log.warning("reload refused, still serving %s: %s", st.predictor.name, e)
        raise ServiceError("unsupported_precision", f"{e} (still serving the previous model)") from None
    except CheckpointError as e:
        st.metrics.reloads.labels("api", "refused").inc()
        log.warning("reload refused, still serving %s: %s", st.predictor.name, e)
        raise ServiceError("invalid_checkpoint", f"{e} (still serving the previous model)") from None
    took = time.perf_counter() - start
    st.metrics.reloads.labels("api", "ok").inc()
    log.info(
        "reloaded: %s (%s) -> %s (%s) in %.2fs", old.name, old.sha256[:12], new.name, new.sha256[:12], took
    )
    return {
        "model": new.model_ref(),
        "previous": old.model_ref(),
        "checkpoint": str(path),
        "reload_ms": round(took * 1000, 1),
    }
