"""What an explanation costs, measured against a prediction on the same server.

    python -m bench.explain [--requests 30] [--out docs/explain-bench.md]

For convnet and resnet18 (random weights: the cost does not depend on them), one `python -m service`
each: median latency of sequential /v1/predict vs /v1/explain requests, then /v1/predict's median
while 4 clients send /v1/explain back to back vs idle. Ratios within one run, never absolute targets.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.servers import service_server
from model.checkpoint import CheckpointMeta, save_checkpoint
from model.registry import build_model, default_preprocess

LABELS = ["circle", "ring", "triangle", "square", "star", "cross", "arrow"]


def checkpoint(arch: str, folder: Path) -> Path:
    pre = default_preprocess(arch)
    torch.manual_seed(0)
    model = build_model(arch, len(LABELS), pre.channels, pre.size)
    meta = CheckpointMeta(arch=arch, labels=LABELS, preprocess=pre.to_dict(), name=f"bench-{arch}")
    path = folder / f"{arch}.safetensors"
    save_checkpoint(path, model, meta)
    return path


def image(side: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def post(port: int, path: str, body: bytes) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}")
    finally:
        conn.close()
    return time.perf_counter() - start


def median_ms(port: int, path: str, body: bytes, n: int) -> float:
    return 1000 * statistics.median(post(port, path, body) for _ in range(n))


def hammered_predict_ms(port: int, body: bytes, n: int, clients: int = 4) -> tuple[float, int]:
    stop = threading.Event()
    done = [0]

    def hammer() -> None:
        while not stop.is_set():
            post(port, "/v1/explain", body)
            done[0] += 1

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the explain queue is full before the first measured prediction
    try:
        return median_ms(port, "/v1/predict", body, n), done[0]
    finally:
        stop.set()
        for t in threads:
            t.join()


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line]
    model_name = names[0] if names else "?"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in ("convnet", "resnet18"):
            ckpt = checkpoint(arch, folder)
            body = image(default_preprocess(arch).resize or 64)
            # explain_queue_limit above 4 clients: every hammering request is served, none refused
            settings = {"explain_queue_limit": "8", "max_batch_wait_ms": "0"}
            with service_server(ckpt, settings, folder, name=arch) as server:
                port = server.port
                for path in ("/v1/predict", "/v1/explain"):  # first requests: lazy loads, allocator
                    post(port, path, body)
                predict = median_ms(port, "/v1/predict", body, args.requests)
                explain = median_ms(port, "/v1/explain", body, args.requests)
                idle = median_ms(port, "/v1/predict", body, args.requests)
                busy, explained = hammered_predict_ms(port, body, args.requests)
            rows.append((arch, predict, explain, idle, busy, explained))
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {model_name} "
        f"({platform.machine()}), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the "
        "end: ratios only.",
        f"`python -m bench.explain --requests {args.requests}`; medians of sequential requests.",
        "",
        "| model | predict ms | explain ms | explain / predict | predict p50 idle ms | "
        "predict p50, 4 clients on /v1/explain | ratio | explanations served meanwhile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch, predict, explain, idle, busy, explained in rows:
        lines.append(
            f"| {arch} | {predict:.1f} | {explain:.1f} | {explain / predict:.1f}x | {idle:.1f} | "
            f"{busy:.1f} | {busy / idle:.2f}x | {explained} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
