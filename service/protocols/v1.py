"""The /v1 answer: `predictions` for one image, `results` (with per-image errors) for several."""

from __future__ import annotations

import json
from typing import Any

from service.errors import ImageError
from service.middleware import error_body
from service.pipeline import Outcome


def render(outcome: Outcome, single: bool) -> bytes:
    items: list[dict[str, Any]] = []
    for index, r in enumerate(outcome.items):
        if isinstance(r, ImageError):
            items.append({"index": index, **error_body(r.code, r.message, None, index)})
            continue
        item: dict[str, Any] = {"index": index, "predictions": r.predictions}
        if r.probabilities is not None:
            item["probabilities"] = r.probabilities
        items.append(item)
    answer: dict[str, Any] = {"model": outcome.model}
    if single:
        answer.update((key, v) for key, v in items[0].items() if key != "index")
    else:
        answer["results"] = items
    answer["timing_ms"] = outcome.timing_ms
    return json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
