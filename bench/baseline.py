"""The baseline: the plain FastAPI endpoint most people write first. Part of the benchmark, not shipped.

It decodes the upload with Pillow (a full-resolution decode, no reduced-scale draft), applies the
checkpoint's own eval transform (the same geometry and normalisation the service uses, so both do the
same work per pixel), and runs the model on that one image, on the event loop: one request at a time,
no batching, no thread hops. It is deliberately not handicapped: the access log is off (as it is in
the service by default), and the model is warmed up before /readyz answers.

    python -m bench.baseline --checkpoint F --port P [--torch-threads N] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from model.checkpoint import load_checkpoint


def create_app(checkpoint: Path, device: str = "cpu") -> FastAPI:
    loaded = load_checkpoint(checkpoint)
    dev = torch.device(device)
    model = loaded.model.to(dev).eval()
    pre = loaded.preprocess
    transform = pre.eval_transform()
    labels = loaded.meta.labels
    with torch.inference_mode():
        model(torch.zeros((1, *pre.input_shape), device=dev))
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = 5) -> Any:
        body = await request.body()
        try:
            img = Image.open(io.BytesIO(body)).convert(pre.pil_mode)
        except Exception as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        x = transform(img).unsqueeze(0).to(dev)  # (1, C, H, W)
        with torch.inference_mode():
            probs = model(x).softmax(dim=-1)[0].cpu()
        p, i = probs.topk(min(top_k, len(labels)))
        return {
            "predictions": [
                {"label": labels[j], "index": j, "probability": q}
                for q, j in zip(p.tolist(), i.tolist(), strict=True)
            ]
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N: the device the service is on")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import uvicorn

    uvicorn.run(create_app(args.checkpoint, args.device), host=args.host, port=args.port, access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
