"""`--precision auto`: a reduced precision where the hardware has it, it measured faster at warm-up and
it agrees with fp32 on top-1 over a probe of real-looking images; fp32 otherwise.

- Hardware: on the CPU bf16 needs avx512_bf16 or amx_bf16 (x86) or bf16 (aarch64) in /proc/cpuinfo.
  oneDNN also "supports" bf16 on plain AVX-512 by emulation (torch.ops.mkldnn._is_mkldnn_bf16_supported
  says True there), which is slower than fp32, so the flags are read, not torch's answer. On CUDA the
  candidate is bf16 where it is native (compute capability 8.0+, or ROCm; fp32's range, so no fp16
  overflow), fp16 on Volta/Turing (7.x: tensor cores), none before. The ONNX runtimes run fp32.
- Speed: warm-up (service/threads.py) already times fp32 on a lone image and on one batch (the largest
  warmed size up to 8) at the thread counts it chose; the candidate is timed the same way at the same
  counts. It wins when its batch takes below BATCH_GAIN of fp32's and its lone image below LONE_LOSS:
  throughput under load is what a reduced precision is for, and a lone image runs when the service is
  idle, so it may lose a little there (measured on the AMD EPYC Zen 4: mobilenet_v3_small's batch 0.68x
  but its lone image 1.0-1.15x; resnet18 0.5x at both).
- Agreement: PROBE_COUNT smooth synthetic images with structure (blobs, a disc, a gradient: closer to
  photos than uniform noise, on which reduced precision flips more near-ties) through both; every
  image must keep fp32's top-1 class (AGREEMENT_BAR), or fp32 is served.

The decision (`decide`) is a pure function of those numbers, so tests drive it without timing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from service.cpu_flags import NO_BF16, cpu_bf16_flags

log = logging.getLogger(__name__)
BATCH_GAIN = 0.9  # the candidate's batch must take below 0.9x fp32's time: timing noise is ~5%
LONE_LOSS = 1.1  # and its lone image at most 1.1x: an idle-time latency loss traded for throughput
PROBE_COUNT = 16  # one full default batch: ~0.3 s of resnet18 fp32 on 2 cores
AGREEMENT_BAR = 1.0  # share of probe images whose top-1 must agree: all of them
_DISC_LOW, _DISC_SPAN = torch.tensor([-0.6, -0.6, 0.15]), torch.tensor([1.2, 1.2, 0.4])  # x, y, radius


@dataclass(frozen=True)
class Measured:
    """What warm-up measured for fp32 and the candidate (seconds: fastest of a few runs)."""

    candidate: str
    batch: int
    fp32_batch_s: float
    low_batch_s: float
    fp32_one_s: float
    low_one_s: float
    agreed: int
    probes: int


@dataclass(frozen=True)
class Choice:
    """The precision being served and why (GET /v1/model `precision_choice`)."""

    setting: str  # what was asked: fp32, bf16, fp16 or auto
    precision: str
    reason: str
    measured: Measured | None = None

    def describe(self) -> dict[str, Any]:
        return {"setting": self.setting, "precision": self.precision, "reason": self.reason,
                "measured": asdict(self.measured) if self.measured else None}


def candidate(
    device: torch.device, runtime: str, cpu_flags: list[str] | None = None
) -> tuple[str | None, str]:
    """(the reduced precision auto may try, or None; why): hardware only, nothing timed yet."""
    if runtime != "torch":
        return None, f"{runtime} runs fp32"
    if device.type == "cuda":
        if torch.version.hip:
            return "bf16", "ROCm: native bf16"
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"compute capability {major}.{minor}: native bf16"
        if major >= 7:
            return "fp16", f"compute capability {major}.{minor}: fp16 tensor cores, no native bf16"
        return None, f"compute capability {major}.{minor}: no tensor cores"
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    if flags:
        return "bf16", "/".join(flags)
    return None, NO_BF16


def decide(m: Measured) -> Choice:
    """The rule of the module docstring, on given numbers; the reason names them."""
    batch_x = m.fp32_batch_s / m.low_batch_s if m.low_batch_s > 0 else float("inf")
    lone_x = m.fp32_one_s / m.low_one_s if m.low_one_s > 0 else float("inf")
    speed = f"{batch_x:.2f}x fp32's speed at batch {m.batch}, {lone_x:.2f}x on a lone image"
    agreed = f"top-1 agreed {m.agreed}/{m.probes}"
    if m.probes == 0 or m.agreed < AGREEMENT_BAR * m.probes:
        return Choice("auto", "fp32", f"auto: fp32, {m.candidate} {agreed} (needs all)", m)
    fast_batch = m.low_batch_s < BATCH_GAIN * m.fp32_batch_s
    ok_lone = m.low_one_s <= LONE_LOSS * m.fp32_one_s
    if fast_batch and ok_lone:
        return Choice("auto", m.candidate, f"auto: {m.candidate} faster ({speed}), {agreed}", m)
    why = (f"a batch needs > {1 / BATCH_GAIN:.2f}x" if not fast_batch
           else f"a lone image needs >= {1 / LONE_LOSS:.2f}x")
    return Choice("auto", "fp32", f"auto: fp32, {m.candidate} {speed} ({why}), {agreed}", m)


def probe_images(input_shape: tuple[int, int, int], count: int = PROBE_COUNT, seed: int = 0) -> torch.Tensor:
    """(count, C, H, W) uint8 smooth images with structure, deterministic: a bicubic-upsampled coarse
    random field (blobs at 4..16 cells across), a linear gradient and one filled disc of a random
    colour, plus a little pixel noise (sensor grain)."""
    c, h, w = input_shape
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((count, c, h, w), dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    for i in range(count):
        cells = int(torch.randint(4, 17, (1,), generator=g))
        coarse = torch.rand((1, c, cells, cells), generator=g)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        angle = float(torch.rand(1, generator=g)) * 6.2832
        grad = (xx * torch.cos(torch.tensor(angle)) + yy * torch.sin(torch.tensor(angle))) * 0.25
        img = 0.7 * field + grad
        # centre anywhere in the middle 60% of each axis, radius 15-55% of the half-width
        cx, cy, r = _DISC_LOW + torch.rand(3, generator=g) * _DISC_SPAN
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
        colour = torch.rand((c, 1, 1), generator=g)
        img = torch.where(disc, colour.expand(c, h, w), img)
        img = img + 0.02 * torch.randn((c, h, w), generator=g)
        out[i] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out
