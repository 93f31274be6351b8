"""Wire formats: each protocol parses its request into pipeline entries and renders the outcome."""

from __future__ import annotations

PROTOCOLS = ("v1", "v2")


def protocol_of(path: str) -> str | None:
    """Which protocol an inference path speaks (None: not an inference endpoint, nothing counted)."""
    if path == "/v1/predict":
        return "v1"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2"
    return None


def endpoint_label(path: str) -> str | None:
    """The bounded `endpoint` label of a /v2 model path (its template), None for other paths."""
    if not path.startswith("/v2/models/"):
        return None
    versioned = "/versions/" in path
    base = "/v2/models/{name}/versions/{version}" if versioned else "/v2/models/{name}"
    for suffix in ("/infer", "/ready"):
        if path.endswith(suffix):
            return base + suffix
    return base
