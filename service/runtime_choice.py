"""`--runtime auto`: ONNX Runtime where it is installed, it ran the checkpoint like torch (the probe
check every ONNX backend passes) and it was measured faster on this machine (at a reload's warm-up,
or on a first start after ready: service/runtime_trial.py); torch otherwise.

Why measure: the answer is the CPU's and the model's. On the avx2-only AMD EPYC Zen 3, onnxruntime
took 0.43x torch's time for the default convnet's lone image, 0.65x for resnet18's and 0.83x for its
batch of 16 (2 threads, fp32); on the Zen 5 machine with bf16 hardware torch bf16 served resnet18
faster than onnxruntime fp32 (docs/benchmarks.md). So the candidate is timed against whatever torch
will serve (fp32, or the reduced precision `--precision auto` kept), on the same lone image and
batch and at the same thread counts as the precision choice, alternating (service/threads.py).

- The candidate: onnxruntime on the CPU, for a safetensors checkpoint served eagerly (trace and
  compile are torch modes someone asked for), when neither fp16 nor bf16 was asked for explicitly
  (the ONNX backends run fp32), and when the `onnx` extra is installed. openvino is never chosen by
  itself: the benchmarks found it no faster than onnxruntime for resnet18 and slower for
  mobilenet_v3_small, at ~80-100 MiB more idle RSS.
- The rule (`decide`, a pure function): there is no accuracy to trade (both are fp32 and the probe
  agrees to ~1e-7), so onnxruntime wins when it is faster on average over the lone image and the
  batch (mean time ratio below MEAN_GAIN) and neither side loses by more than the timing noise
  (each ratio at most WORST_LOSS).
- When the two ratios point opposite ways beyond the noise (one under MEAN_GAIN, the other over
  WORST_LOSS) or the mean is within NEAR of MEAN_GAIN, both are timed once more and each side's
  fastest run over the two rounds counts (`unsure`, `merged`): on the AMD EPYC Zen 4 resnet18's
  batch ratio read 0.66-1.29 from one start to the next (two runs a side), which flipped the
  decision.
- Cost: the export, once per checkpoint (cached beside it: 0.1-1.1 s), a session (0.2 s for
  resnet18) and the timing (a few runs of the lone image and the batch each: 1.3-2.2 s for resnet18
  on the Zen 3, where its whole start took 6.6 s). A first start pays it after ready, beside
  serving torch (service/runtime_trial.py); a reload before its swap. The decision is kept, like
  the export, beside the checkpoint (`model.safetensors.runtime-choice.json`), keyed by everything it
  depended on: the checkpoint, both runtimes' versions, the kind of CPU (model, stepping, flags),
  the usable cores, the precision and batch settings (`machine_key`). A start that finds its
  key serves the runtime chosen then and builds only that one; any other start measures again and
  adds its entry. Delete the file to measure again on the same machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError
from service.cpu_flags import cpu_identity
from service.runtimes.export import cache_paths, write_first

log = logging.getLogger(__name__)

MEAN_GAIN = 0.95  # mean of the two time ratios (candidate / torch) must be below this: ~5% noise
WORST_LOSS = 1.05  # and neither ratio above this (a 5% loss on one is within the noise)
CANDIDATE = "onnxruntime"


@dataclass(frozen=True)
class Measured:
    """Fastest of a few alternating runs (seconds) of what torch serves and of the candidate."""

    candidate: str
    torch_precision: str
    batch: int
    torch_batch_s: float
    cand_batch_s: float
    torch_one_s: float
    cand_one_s: float


@dataclass(frozen=True)
class Choice:
    """The runtime being served and why (GET /v1/model `runtime_choice`)."""

    setting: str  # what was asked: torch, onnxruntime, openvino or auto
    runtime: str
    reason: str
    measured: Measured | None = None
    pending: bool = False  # torch serves while a candidate waits to be timed

    def describe(self) -> dict[str, Any]:
        return {"setting": self.setting, "runtime": self.runtime, "reason": self.reason,
                "measured": asdict(self.measured) if self.measured else None, "pending": self.pending}


def pending(cand: str) -> Choice:
    """What serves while `cand` waits to be built or timed beside torch."""
    return Choice("auto", "torch", f"auto: torch until {cand} has been timed beside it", pending=True)


def candidate(device: torch.device, precision: str, compile: str, onnx_file: bool) -> tuple[str | None, str]:
    """(the runtime auto may try beside torch, or None; why). Nothing is timed or imported here but
    the check that the extra is installed."""
    if onnx_file:
        return None, "an ONNX file runs on onnxruntime"
    if device.type != "cpu":
        return None, f"{device.type}: torch is the only runtime for it"
    if compile != "off":
        return None, f"--compile {compile} is a torch mode"
    if precision not in ("fp32", "auto"):
        return None, f"--precision {precision} runs on torch (the ONNX backends run fp32)"
    # Looked up, not imported (19 MiB of RSS a start that recalls "torch" does not need); building
    # the candidate imports it, and a broken install fails there, leaving torch serving.
    if any(_missing(m) for m in (CANDIDATE, "onnx")):
        return None, f"{CANDIDATE} is not installed (pip install 'convserve[onnx]')"
    return CANDIDATE, "installed"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a None in sys.modules (tests), or a broken package
        return True


NEAR = 0.05  # a mean this close to MEAN_GAIN is timed again


def _ratios(m: Measured) -> tuple[float, float]:
    batch_x = m.cand_batch_s / m.torch_batch_s if m.torch_batch_s > 0 else float("inf")
    lone_x = m.cand_one_s / m.torch_one_s if m.torch_one_s > 0 else float("inf")
    return batch_x, lone_x


def unsure(m: Measured) -> bool:
    """Worth a second round of timing before deciding (module docstring)."""
    batch_x, lone_x = _ratios(m)
    opposite = min(batch_x, lone_x) < MEAN_GAIN and max(batch_x, lone_x) > WORST_LOSS
    return opposite or abs((batch_x + lone_x) / 2 - MEAN_GAIN) < NEAR


def merged(a: Measured, b: Measured) -> Measured:
    """Each side's fastest time over two rounds of the same comparison."""
    return dataclasses.replace(a, torch_batch_s=min(a.torch_batch_s, b.torch_batch_s),
                               cand_batch_s=min(a.cand_batch_s, b.cand_batch_s),
                               torch_one_s=min(a.torch_one_s, b.torch_one_s),
                               cand_one_s=min(a.cand_one_s, b.cand_one_s))


def decide(m: Measured) -> Choice:
    """The rule of the module docstring, on given numbers; the reason names them."""
    batch_x, lone_x = _ratios(m)
    speed = (f"{m.candidate} took {batch_x:.2f}x torch {m.torch_precision}'s time at batch {m.batch}, "
             f"{lone_x:.2f}x on a lone image")
    mean = (batch_x + lone_x) / 2
    if mean < MEAN_GAIN and max(batch_x, lone_x) <= WORST_LOSS:
        return Choice("auto", m.candidate, f"auto: {m.candidate}, faster ({speed})", m)
    why = (f"needs a mean below {MEAN_GAIN}" if mean >= MEAN_GAIN
           else f"neither may exceed {WORST_LOSS}")
    return Choice("auto", "torch", f"auto: torch, {speed} ({why})", m)


CHOICE_SUFFIX = "runtime-choice.json"
CHOICE_FORMAT = 1


def machine_key(sha256: str, cand: str, precision: str, max_batch_size: int, cores: int,
                context: dict[str, Any] | None = None) -> str:
    """Everything a measured choice depended on, as one string (the cache entry's key); `context`:
    the other settings that change either side's time (batch-norm folding, channels_last, pinned
    torch threads, the warm-up sizes that set the timed batch)."""
    import importlib.metadata as md

    version = "?"
    for dist in (cand, f"{cand}-gpu", f"{cand}-openvino", f"{cand}-directml"):  # the wheels that provide it
        try:
            version = f"{dist} {md.version(dist)}"
            break
        except md.PackageNotFoundError:
            continue
    return json.dumps({
        "format": CHOICE_FORMAT, "checkpoint_sha256": sha256, "candidate": cand,
        "candidate_version": version, "torch": torch.__version__, "cpu": cpu_identity(),
        "cores": cores, "precision": precision, "max_batch_size": max_batch_size,
        "settings": {k: str(v) for k, v in sorted((context or {}).items())},
    }, sort_keys=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: measured again, rewritten
        return {}
    return data if isinstance(data, dict) and data.get("format") == CHOICE_FORMAT else {}


def recall(checkpoint: Path, sha256: str, cache_dir: Path | None, key: str) -> tuple[Choice, Path] | None:
    """The choice measured before for exactly this key, and the file it was kept in; or None."""
    for path in cache_paths(checkpoint, sha256, CHOICE_SUFFIX, cache_dir):
        entry = _read(path).get("entries", {}).get(key)
        if not isinstance(entry, dict):
            continue
        try:
            measured = Measured(**entry["measured"])
            return Choice("auto", str(entry["runtime"]), str(entry["reason"]), measured), path
        except (KeyError, TypeError):
            continue
    return None


def remember(checkpoint: Path, sha256: str, cache_dir: Path | None, key: str, choice: Choice) -> Path | None:
    """Add this key's measured choice to the first writable cache file; None (logged) if none is."""
    paths = cache_paths(checkpoint, sha256, CHOICE_SUFFIX, cache_dir)
    data: dict[str, Any] = next((d for d in map(_read, paths) if d), {"format": CHOICE_FORMAT})
    found = data.get("entries")
    entries: dict[str, Any] = found if isinstance(found, dict) else {}
    data["entries"] = entries
    entries[key] = {
        "runtime": choice.runtime, "reason": choice.reason,
        "measured": asdict(choice.measured) if choice.measured else None,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        return write_first(paths, json.dumps(data, indent=1, sort_keys=True).encode())
    except CheckpointError as e:
        log.warning("runtime choice not kept for the next start: %s", e)
        return None
