"""The in-process bound: what this machine can do with no HTTP at all.

Decode + preprocess (model.preprocess.open_image -> to_uint8, exactly the service's decode path) run
in a pool of decode threads, overlapped with batched channels_last inference in the main thread, with
the same model (BatchNorm folded into the convolutions, as the service loads it), torch threads,
decode threads, batch size and precision as the service under test, and its runtime: torch, or
with --onnx the ONNX Runtime sessions the service runs on its exported file.
Pillow and torch both release the GIL in their heavy loops, so the two really overlap. Throughput of
this pipeline is the ceiling the service is measured against.

    python -m bench.inprocess --checkpoint F --images DIR --count N [--batch 16] [--decode-threads 2]
        [--torch-threads 0] [--precision fp32|bf16] [--onnx FILE] [--components] [--clients N]

Prints one JSON object: images/s of the pipeline (and, with --components, of decode alone and of
inference alone, which say which of the two bounds it; with --clients N, of a closed loop with at most
N images in flight, which is what N closed-loop HTTP clients would allow with no HTTP cost).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import load_checkpoint
from model.preprocess import Preprocess, open_image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode(data: bytes, pre: Preprocess) -> torch.Tensor:
    return pre.to_uint8(open_image(data, pre))  # (C, H, W) uint8


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the convolution before it (torch.fx), as the service does at
    load time, so the bound is not handicapped by work the service skips. Unchanged if untraceable."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=False).eval()
    except Exception:  # not symbolically traceable: run it as it is
        return model


class Bound:
    def __init__(self, checkpoint: Path, batch: int, precision: str = "fp32", channels_last: bool = True,
                 fold: bool = True, device: str = "cpu", onnx: Path | None = None):
        loaded = load_checkpoint(checkpoint)
        self.pre = loaded.preprocess
        self.dtype = DTYPES[precision]
        self.batch = batch
        self.channels_last = channels_last and onnx is None
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model = fold_batchnorm(loaded.model) if fold else loaded.model
        self.device = torch.device(device)
        self.model: Callable[[torch.Tensor], torch.Tensor] = (
            model.to(device=self.device, dtype=self.dtype).to(memory_format=fmt).eval())
        if onnx is not None:  # the service serves ONNX Runtime (--runtime auto chose it): so does the bound
            from service.runtimes.onnxruntime import OnnxRuntime

            self.model = OnnxRuntime(onnx, "fp32").run  # the service's sessions: same options, same file

    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            x = self.pre.normalize(torch.stack(images).to(self.device), self.dtype)  # (B, C, H, W)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().softmax(dim=-1).cpu()  # .cpu(): waits for the device

    def warmup(self) -> None:
        blank = torch.zeros(self.pre.input_shape, dtype=torch.uint8)
        for n in sorted({1, self.batch}):
            self.infer([blank] * n)

    def pipeline(self, bodies: list[bytes], count: int, pool: ThreadPoolExecutor) -> float:
        """Decode `count` images (cycling `bodies`) overlapped with inference; returns seconds."""
        window: deque[Future[torch.Tensor]] = deque()
        submitted = 0
        depth = 2 * self.batch  # the next batch decodes while the current one runs
        start = time.perf_counter()
        done = 0
        while done < count:
            while submitted < count and len(window) < depth:
                window.append(pool.submit(decode, bodies[submitted % len(bodies)], self.pre))
                submitted += 1
            n = min(self.batch, len(window))
            images = [window.popleft().result() for _ in range(n)]
            while submitted < count and len(window) < depth:  # refill before the model takes the GIL
                window.append(pool.submit(decode, bodies[submitted % len(bodies)], self.pre))
                submitted += 1
            self.infer(images)
            done += n
        return time.perf_counter() - start

    def closed_loop(self, bodies: list[bytes], count: int, pool: ThreadPoolExecutor, clients: int) -> float:
        """`clients` images in flight at most, as `clients` closed-loop HTTP clients allow: each
        decoded image waits for the model, which runs whatever is decoded (up to `batch`) as soon as
        it is free, and an image's next one starts decoding only when its answer is out: the service's
        batching without HTTP. As in service.batching, a batch short of full waits for images still
        decoding, up to one image's share of a batch's time (smoothed). Returns seconds for `count`
        images."""
        pending: set[Future[torch.Tensor]] = set()
        submitted = done = 0
        per_image = 0.0
        start = time.perf_counter()
        while submitted < min(clients, count):
            pending.add(pool.submit(decode, bodies[submitted % len(bodies)], self.pre))
            submitted += 1
        while done < count:
            ready, rest = wait(pending, return_when=FIRST_COMPLETED)
            until = time.perf_counter() + per_image
            while len(ready) < self.batch and rest and time.perf_counter() < until:
                more, rest = wait(rest, timeout=until - time.perf_counter(), return_when=FIRST_COMPLETED)
                ready |= more
            batch = list(ready)[: self.batch]
            pending.difference_update(batch)
            began = time.perf_counter()
            self.infer([f.result() for f in batch])
            took = (time.perf_counter() - began) / len(batch)
            per_image = 0.8 * per_image + 0.2 * took if per_image else took
            done += len(batch)
            for _ in batch:  # each answered client sends its next image
                if submitted < count:
                    pending.add(pool.submit(decode, bodies[submitted % len(bodies)], self.pre))
                    submitted += 1
        return time.perf_counter() - start

    def decode_only(self, bodies: list[bytes], count: int, pool: ThreadPoolExecutor) -> float:
        start = time.perf_counter()
        list(pool.map(lambda i: decode(bodies[i % len(bodies)], self.pre), range(count)))
        return time.perf_counter() - start

    def infer_only(self, bodies: list[bytes], count: int) -> float:
        images = [decode(b, self.pre) for b in bodies[: self.batch]]
        images = [images[i % len(images)] for i in range(self.batch)]
        batches = max(1, count // self.batch)
        start = time.perf_counter()
        for _ in range(batches):
            self.infer(images)
        return (time.perf_counter() - start) * count / (batches * self.batch)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bound = Bound(args.checkpoint, args.batch, args.precision, not args.no_channels_last, not args.no_fold,
                  args.device, args.onnx)
    bound.warmup()
    bodies = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    if not bodies:
        raise SystemExit(f"no .jpg files in {args.images}")
    out: dict[str, Any] = {
        "count": args.count,
        "batch": args.batch,
        "decode_threads": args.decode_threads,
        "torch_threads": torch.get_num_threads(),
        "precision": args.precision,
        "device": args.device,
        "runtime": "onnxruntime" if args.onnx else "torch",
    }
    with ThreadPoolExecutor(args.decode_threads, thread_name_prefix="decode") as pool:
        bound.pipeline(bodies, min(args.count, 2 * args.batch), pool)  # warm the pool and allocator
        rates, cpu = [], []
        for _ in range(args.repeats):
            cpu0 = time.process_time()  # all threads of this process: decode pool + torch's
            rates.append(args.count / bound.pipeline(bodies, args.count, pool))
            cpu.append((time.process_time() - cpu0) / args.count)
        out["images_per_s"] = sorted(rates)[len(rates) // 2]
        if args.clients:
            bound.closed_loop(bodies, min(args.count, 2 * args.clients), pool, args.clients)  # warm
            out["closed_loop_clients"] = args.clients
            out["closed_loop_per_s"] = args.count / bound.closed_loop(bodies, args.count, pool, args.clients)
        out["runs"] = rates
        out["cpu_ms_per_image"] = 1000 * sorted(cpu)[len(cpu) // 2]
        if args.components:
            out["decode_only_per_s"] = args.count / bound.decode_only(bodies, args.count, pool)
            out["infer_only_per_s"] = args.count / bound.infer_only(bodies, args.count)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inprocess")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="a folder of .jpg files")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="pipeline runs; the median is reported")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm layers separate")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (the service's device)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="run inference with ONNX Runtime on this exported file (the service's, when it "
                   "serves onnxruntime) instead of torch")
    p.add_argument("--components", action="store_true", help="also time decode alone and inference alone")
    p.add_argument("--clients", type=int, default=0,
                   help="also time a closed loop with at most this many images in flight (the service's "
                   "batching for that many clients, without HTTP)")
    json.dump(measure(p.parse_args(argv)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
