"""The machine's achievable peak and a model's work per image, so "close to the limit" is a number.

- `peak_gflops`: median GFLOP/s of a 2048x2048 matmul per precision on given threads, measured in the
  same run as the load (a large GEMM is the best case oneDNN/MKL reach on this CPU: what a CNN's
  convolutions can at most approach).
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
from pathlib import Path

import torch


def peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Median GFLOP/s of an n x n matmul per precision (int8: torch._int_mm, int32 accumulation)."""
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    mats = {
        "fp32": torch.randn(n, n),
        "bf16": torch.randn(n, n, dtype=torch.bfloat16),
        "int8": torch.randint(-128, 127, (n, n), dtype=torch.int8),
    }
    for name, m in mats.items():
        def op(m: torch.Tensor = m, name: str = name) -> torch.Tensor:
            return torch._int_mm(m, m) if name == "int8" else m @ m

        op()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        out[name] = 2 * n**3 / statistics.median(times) / 1e9
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
    return {"threads": threads, "matmul_n": n, "peak_gflops": peak_gflops(threads, n, repeats),
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
