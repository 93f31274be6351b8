"""GET /v1/model: what is being served, and how."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

from model.device import tf32_state
from service.state import get_state

router = APIRouter(tags=["model"])


@router.get("/v1/model", summary="The served model: classes, preprocessing, checkpoint, device, precision")
async def model_info(request: Request) -> dict[str, Any]:
    st = get_state(request)
    s = st.settings
    return {
        **st.predictor.describe(),
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
