"""The machine's achievable peak and a model's work per image, so "close to the limit" is a number.

- `peak_gflops`: per precision, the better median GFLOP/s of a 2048x2048 matmul and of a large 3x3
  convolution on given threads, measured in the same run as the load (the best case the CPU's
  kernels reach on the two operations a CNN is made of; on AMD the fp32 matmul alone underestimates
  it 2.5x, see the function).
- `gflop_per_image`: FLOPs of one forward pass on one image, by torch.utils.flop_counter
  (convolutions and matmuls; batch-norm, activations and pooling are not counted, as in every GFLOP
  figure quoted for these models). Convention: **2 FLOPs per multiply-add**, the same as the GEMM's
  2n^3, so the share is like for like. torchvision's model tables count multiply-adds instead
  (resnet18 "1.81 GFLOPS"): its numbers are half of these (resnet18 at 224x224: 3.64 GFLOP here).

`python -m bench.peak --checkpoint FILE --threads N` prints both as one JSON line (the main bench runs
it in its own process, on the service's batch thread count, after the servers have stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SLOW_S = 2.0  # a first run this long is a fallback path (no vector kernel): its time is the answer


def _median_rate(op: Callable[[], object], flop: float, repeats: int) -> float:
    start = time.perf_counter()
    op()  # first run: kernels chosen, buffers allocated
    first = time.perf_counter() - start
    if first > SLOW_S:  # e.g. torch._int_mm without VNNI (Zen 3: 14 s for 2048^3); repeats add nothing
        return flop / first / 1e9
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return flop / statistics.median(times) / 1e9


def peak_gflops(
    threads: int, n: int = 2048, repeats: int = 5, bf16: bool | None = None, int8: bool = True
) -> dict[str, float | None]:
    """The best median GFLOP/s per precision of an n x n matmul and of a 3x3 convolution (batch 16,
    256 -> 256 channels, 14x14: resnet18's layer3), on `threads` threads; int8: the matmul only
    (torch._int_mm, int32 accumulation). The convolution is there because torch's fp32 matmul goes
    through a BLAS that may not use the CPU's widest vectors (on the AMD EPYC machine: 152 GFLOP/s
    for the 2048^3 matmul, 380 for the convolution through oneDNN, on 2 threads), and a CNN's
    arithmetic is convolutions.

    bf16 is measured only where the CPU has bf16 hardware (`bf16=None`: read /proc/cpuinfo as
    `--precision auto` does), else it is None: without it torch falls back to a scalar loop on one
    thread (AMD EPYC Zen 3, avx2 only: 1.3 GFLOP/s, so the 2048^3 matmul alone ran for minutes), and
    no service runs bf16 there. `int8=False` leaves int8 out (the main bench reports no int8 model)."""
    from service.cpu_flags import cpu_bf16_flags

    torch.set_num_threads(threads)
    if bf16 is None:
        bf16 = bool(cpu_bf16_flags())
    out: dict[str, float | None] = {"bf16": None}
    gemm = 2.0 * n**3
    b, c, hw = 16, 256, 14
    conv_flop = 2.0 * b * c * c * 9 * hw * hw
    with torch.no_grad():
        precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if bf16 else [])
        for name, dtype in precisions:
            m = torch.randn(n, n, dtype=dtype)
            x = torch.randn(b, c, hw, hw, dtype=dtype)
            conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval().to(dtype)
            out[name] = max(_median_rate(lambda m=m: m @ m, gemm, repeats),
                            _median_rate(lambda x=x, conv=conv: conv(x), conv_flop, repeats))
        if int8:
            q = torch.randint(-128, 127, (n, n), dtype=torch.int8)
            out["int8"] = _median_rate(lambda: torch._int_mm(q, q), gemm, repeats)
    return out


def gflop_per_image(model: torch.nn.Module, shape: tuple[int, int, int]) -> float:
    """GFLOP (2 per multiply-add) of one eval-mode forward pass on one (C, H, W) image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() / 1e9


def measure(checkpoint: Path, threads: int, n: int = 2048, repeats: int = 5) -> dict[str, object]:
    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    return {"threads": threads, "matmul_n": n, "peak_gflops": peak_gflops(threads, n, repeats, int8=False),
            "gflop_per_image": gflop_per_image(loaded.model, loaded.preprocess.input_shape)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peak", description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.checkpoint, a.threads, a.n, a.repeats)))


if __name__ == "__main__":
    main()
