"""Errors that are about the request or the server rather than one image.

Image problems are `service.errors.ImageError`; both render as `{"error": {"code", "message", ...}}`
at the edge (service/routes/handlers.py). The tables here feed the README's error-code table.
"""

from __future__ import annotations

from typing import Final


class ServiceError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        *,
        images: int = 1,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else SERVICE_ERROR_CODES[code][0]
        self.headers = headers or {}
        self.images = images  # how many images the request loses (convserve_rejected_images_total)


SERVICE_ERROR_CODES: Final[dict[str, tuple[int, str]]] = {
    "invalid_parameter": (
        422,
        "A query parameter is out of range or malformed (e.g. top_k outside 1..1000).",
    ),
    "overloaded": (503, "The queue is full (CONVSERVE_QUEUE_LIMIT); retry after the Retry-After seconds."),
    "shutting_down": (503, "Draining after SIGTERM: /readyz says so; /v1/predict once the batcher stops."),
    "timeout": (504, "The request waited longer than CONVSERVE_REQUEST_TIMEOUT_S."),
    "internal_error": (
        500,
        "The model failed on the batch holding this request, or gave NaN/inf for its image; the log "
        "has the request id.",
    ),
    "not_ready": (
        503,
        "The model is still warming up (the port opens before warm-up ends); retry after Retry-After.",
    ),
    "warmup_failed": (503, "/healthz and /readyz: the model failed its warm-up; the process is stopping."),
    "device_failed": (
        503,
        "The device failed (e.g. a sticky CUDA error): /healthz, /readyz and /v1/predict answer 503 so "
        "the orchestrator replaces this replica.",
    ),
    "not_found": (404, "No such endpoint."),
    "method_not_allowed": (405, "The endpoint does not take this HTTP method."),
    "unauthorized": (401, "The X-API-Key header is missing."),
    "forbidden": (403, "The X-API-Key header does not match CONVSERVE_ADMIN_API_KEY."),
    "reload_disabled": (403, "Reload is disabled because no CONVSERVE_ADMIN_API_KEY is configured."),
    "invalid_checkpoint": (
        400,
        "The reload checkpoint cannot be loaded or warmed up; the old model keeps serving.",
    ),
    "unsupported_precision": (
        400,
        "The reload checkpoint cannot run at the configured precision on this device (e.g. bf16 before "
        "compute capability 8.0); the old model keeps serving.",
    ),
    "reload_in_progress": (409, "Another reload is running; try again when it has finished."),
    "headers_too_large": (
        431,
        "The request headers exceed CONVSERVE_MAX_HEADER_BYTES or CONVSERVE_MAX_HEADER_COUNT; refused "
        "before the body is read, and the connection is closed.",
    ),
    "request_line_too_long": (414, "The request line exceeds CONVSERVE_MAX_REQUEST_LINE_BYTES."),
    "header_timeout": (
        408,
        "The request headers were not complete within CONVSERVE_HEADER_TIMEOUT_S (a slow or stalled "
        "client); the connection is closed.",
    ),
}

# Reasons counted in convserve_rejected_images_total besides the image error codes.
REJECTION_REASONS: Final[tuple[str, ...]] = (
    "invalid_parameter",
    "overloaded",
    "shutting_down",
    "timeout",
    "internal_error",
    "not_ready",
    "device_failed",
    "client_disconnected",
    "headers_too_large",  # the HTTP layer (service/http_server.py): refused before the app runs
    "request_line_too_long",
    "header_timeout",
)
