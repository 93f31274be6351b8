"""GET /v1/model: what is being served, and how."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from safetensors import safe_open
from starlette.requests import Request

from model.device import tf32_state
from service.routes.openapi import MODEL_RESPONSES
from service.state import get_state

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@functools.lru_cache(maxsize=4)
def parameter_count(path: Path, sha256: str) -> int | None:
    """Learnable parameters as trained (batch-norm folding changes the served model's count), read
    from the safetensors header alone: shapes, no tensor data. `sha256` keys the cache."""
    if path.suffix == ".onnx":  # an exported/int8 artifact: no safetensors header to count from
        return None
    with safe_open(str(path), framework="pt") as f:
        return sum(
            math.prod(f.get_slice(k).get_shape())
            for k in f.keys()  # noqa: SIM118 (safe_open is not a dict)
            if not k.endswith(_BUFFERS)
        )


router = APIRouter(tags=["model"])


@router.get(
    "/v1/model",
    summary="The served model: classes, preprocessing, checkpoint, device, precision",
    responses=MODEL_RESPONSES,
)
async def model_info(request: Request) -> dict[str, Any]:
    st = get_state(request)
    s = st.settings
    predictor = st.predictor
    samples = predictor.path.parent / "samples.png"
    return {
        **predictor.describe(),
        "parameters": parameter_count(predictor.path, predictor.sha256),
        # the training run's sample predictions, when the checkpoint still sits in its run folder
        "samples_png": "/v1/model/samples.png" if samples.is_file() else None,
        # TF32 for fp32 work (CUDA only; the CPU never uses it): the setting and torch's flags now
        "tf32": {"enabled": s.tf32, **tf32_state()},
        "serving": {
            "max_batch_size": s.max_batch_size,
            "max_batch_wait_ms": s.max_batch_wait_ms,
            "queue_limit": s.queue_limit,
            "request_timeout_s": s.request_timeout_s,
            "default_top_k": s.default_top_k,
            "max_upload_bytes": s.max_upload_bytes,
            "max_image_pixels": s.max_image_pixels,
            "decode_threads": s.decode_workers,
            # what warm-up chose (or --torch-threads pinned): intra-op threads for a batch / a lone
            # image; null until warm-up has chosen
            "torch_threads": {"batch": st.batch_threads, "lone": st.lone_threads} if st.ready else None,
        },
    }
