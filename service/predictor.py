"""The model on its device: uint8 image tensors in, probabilities and top-k predictions out.

After construction and warm-up, a Predictor's model is only touched from the batcher's single
inference thread (`run`), so no lock is needed around it. A reload builds a new Predictor beside the
old one (warming it in another thread) and swaps the reference. On CUDA that warm-up runs on a stream of
its own (service.state.side_stream), and both models sit in GPU memory until the old one's last
batch ends: a reload needs room for two models' weights plus the new one's warm-up activations
(docs/gpu.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError, Loaded, file_sha256
from model.onnx_file import OnnxArtifact
from service import runtime_choice
from service.optimize import allow_graphs, bucket
from service.precision import Choice, candidate
from service.runtimes import Runtime, build_runtime, load_source
from service.runtimes.torch import TorchRuntime
from service.settings import usable_cores

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteOutput(RuntimeError):
    """The model produced NaN/inf probabilities for one image (e.g. an fp16 overflow): that image's
    request fails as a server error; the other images of the batch are answered."""


class PrecisionError(ValueError):
    """The serving device cannot run the requested precision natively (e.g. bf16 before Ampere)."""


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse bf16 on a CUDA device without native bf16. Asks about `device` itself (not the
    current device, which is cuda:0 unless set), and does not count emulation as support: bf16
    emulated on a V100 or T4 runs, far slower than fp16 or fp32. Native bf16 needs compute
    capability 8.0 (Ampere) or later; ROCm builds support it on every GPU they run on."""
    if device.type != "cuda" or precision != "bf16" or torch.version.hip:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise PrecisionError(
            f"precision bf16 is not supported natively by {torch.cuda.get_device_name(device)} on {device} "
            f"(compute capability {major}.{minor}; bf16 needs 8.0 or later); serve it with --precision "
            "fp16 or fp32"
        )


class WarmupStopped(Exception):
    """Warm-up was asked to stop (the service is shutting down before it became ready)."""


@dataclass(slots=True)
class Job:
    """One decoded image on its way through the batcher."""

    image: torch.Tensor  # (C, H, W) uint8 on the CPU, or float32 already normalised (a /v2 FP32 tensor)
    top_k: int
    all_probs: bool
    predictor: Predictor  # the model whose preprocessing produced `image`
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class JobResult:
    predictions: list[dict[str, Any]]
    probabilities: list[float] | None
    queue_s: float
    inference_s: float
    batch_size: int
    top1_label: str
    top1_probability: float
    model: dict[str, str]  # the model that answered (a reload may land between decode and inference)


# A candidate to build later: (source, runtime, fold_bn, export cache dir, folded fp32 torch model)
_Deferred = tuple[Loaded | OnnxArtifact, str, bool, Path | None, torch.nn.Module | None]


class Predictor:
    def __init__(
        self,
        loaded: Loaded | OnnxArtifact,
        device: torch.device,
        *,
        runtime: str = "torch",
        export_cache_dir: Path | None = None,
        precision: str = "fp32",
        channels_last: str = "auto",
        compile: str = "off",
        max_batch_size: int = 1,
        fold_bn: bool = True,
        calibration: bool = True,
        choice_context: dict[str, Any] | None = None,
        defer_candidate: bool = False,
    ) -> None:
        """`defer_candidate` (a first start under --runtime auto): the candidate is neither exported
        nor built here but by `build_deferred_candidate`, after the service is ready on torch
        (service/runtime_trial.py)."""
        self.meta = loaded.meta
        self.preprocess = loaded.preprocess
        self.path = loaded.path
        self.labels = list(loaded.meta.labels)
        self.name = loaded.meta.name or loaded.path.stem
        self.version = loaded.meta.version
        # load_checkpoint hashed the bytes it read; an .onnx artifact is hashed here
        self.sha256 = (loaded.sha256 if isinstance(loaded, Loaded) else "") or file_sha256(loaded.path)
        self.ref = {"name": self.name, "version": self.version, "sha256": self.sha256}
        self.temperature = _temperature(loaded, calibration)  # None: raw softmax
        self.device = device
        self._cache_dir = export_cache_dir
        setting = precision
        runtime_setting = runtime
        # --runtime auto (service/runtime_choice.py): torch until warm-up has timed the candidate
        # beside it, or straight away what an earlier start on this kind of machine measured.
        self.runtime_candidate: str | None = None
        self._deferred: _Deferred | None = None
        self._choice_key: str | None = None
        recalled: tuple[runtime_choice.Choice, Path] | None = None
        if runtime == "auto":
            onnx_file = isinstance(loaded, OnnxArtifact)
            runtime = "onnxruntime" if onnx_file else "torch"
            cand, cand_why = runtime_choice.candidate(device, precision, compile, onnx_file)
            if cand is not None:
                context = {"fold_bn": fold_bn, "channels_last": channels_last, **(choice_context or {})}
                self._choice_key = runtime_choice.machine_key(self.sha256, cand, precision, max_batch_size,
                                                              usable_cores(), context)
                recalled = runtime_choice.recall(loaded.path, self.sha256, export_cache_dir, self._choice_key)
                if recalled is not None and recalled[0].runtime == cand:
                    runtime = cand
        # --precision auto: serve fp32 until warm-up has timed and probed the candidate beside it
        # (service.threads.settle_precision); None when the hardware or runtime offers none.
        self.candidate: str | None = None
        if precision == "auto":
            self.candidate, why = candidate(device, runtime)
            precision = "fp32"
        self.precision = precision
        self.dtype = DTYPES[precision]  # the ONNX backends accept fp32 only (build_runtime says so)
        if device.type == "cpu" and precision == "fp16":
            log.warning("precision fp16 on the CPU is usually slower than fp32; bf16 is the CPU's half type")
        check_precision(device, precision)
        c, h, w = self.preprocess.input_shape
        self.input_shape = (c, h, w)
        # One factory call: torch (eager/trace/compile, as always), onnxruntime or openvino; the ONNX
        # backends export the checkpoint (or read an .onnx file) and pass a probe check first.
        def build(name: str) -> Runtime:
            return build_runtime(name, loaded, device, sha256=self.sha256, precision=precision,
                                 channels_last=channels_last, compile=compile, fold_bn=fold_bn,
                                 cache_dir=export_cache_dir)

        try:
            self.runtime = build(runtime)
        except Exception as e:
            if recalled is None or runtime == "torch":
                raise
            # the kept decision's runtime no longer runs here (a damaged install, an unwritable cache
            # folder, a probe mismatch): serve torch, and measure again at the next start
            cand_why = f"{cand} was chosen before but cannot run now ({e})"
            log.warning("runtime auto: %s; serving torch", cand_why)
            recalled, runtime, self._choice_key, cand = None, "torch", None, None
            self.runtime = build(runtime)
        self.precision = self.runtime.precision  # int8 for a quantized file
        # The runtimes built, by variant: a precision of the torch runtime ("fp32", "bf16"), or the
        # name of another runtime ("onnxruntime"); `variant` is the one in use.
        self._runtimes: dict[str, Runtime] = {self.precision: self.runtime}
        self.variant = self.precision
        if setting != "auto":
            self.precision_choice = Choice(setting, self.precision, f"set by --precision {setting}")
        elif self.candidate is None:  # decided now, nothing to time: said here as warm-up says its own
            self.precision_choice = Choice(setting, self.precision, f"auto: fp32, {why}")
            log.info("precision %s", self.precision_choice.reason)
        else:
            assert isinstance(loaded, Loaded) and isinstance(self.runtime, TorchRuntime)
            self._runtimes[self.candidate] = self._candidate_runtime(loaded, self.runtime, channels_last,
                                                                     compile)
            self.precision_choice = Choice(setting, self.precision,
                                           f"auto: fp32 until warm-up has timed {self.candidate} ({why})")
        self.runtime_choice = runtime_choice.Choice(runtime_setting, runtime, f"set by --runtime {runtime}")
        if recalled is not None:
            kept, where = recalled
            self.runtime_choice = dataclasses.replace(
                kept, reason=f"{kept.reason}; measured by an earlier start on this machine, kept in {where}")
            log.info("runtime %s", self.runtime_choice.reason)
        elif runtime_setting == "auto" and cand is None:
            self.runtime_choice = runtime_choice.Choice("auto", runtime, f"auto: {runtime}, {cand_why}")
            log.info("runtime %s", self.runtime_choice.reason)
        elif runtime_setting == "auto":
            assert cand is not None
            folded = self._folded_fp32()
            if isinstance(loaded, Loaded) and folded is not None:  # the unfolded weights are not kept
                loaded = dataclasses.replace(loaded, model=folded)
            self._deferred = (loaded, cand, fold_bn, export_cache_dir, folded)
            self.runtime_choice = runtime_choice.pending(cand)
            if not defer_candidate:  # built now, timed at warm-up (a reload; tests)
                self.build_deferred_candidate()
        self.model = self.runtime.model  # the torch callable; None for the ONNX backends
        self.folded_bn = self.runtime.folded_bn
        self.channels_last = getattr(self.runtime, "channels_last", False)
        self.compile = compile if runtime == "torch" else "off"
        # trace/compile specialise on the batch size: every batch is padded up to a warmed-up size
        # (set by `warmup`), so no graph is ever built on the request path. Eager runs any size.
        self.buckets: list[int] = []
        self._blank = torch.zeros(self.input_shape, dtype=torch.uint8)
        self._cuda = device.type == "cuda"
        if self._cuda:
            # A pinned staging buffer makes the host->device copy asynchronous; a side stream lets it
            # overlap whatever is still running on the compute stream.
            self._pinned = torch.empty((max_batch_size, c, h, w), dtype=torch.uint8).pin_memory()
            self._copy_stream = torch.cuda.Stream(device)

    @classmethod
    def load(cls, path: Path, device: torch.device, **kwargs: Any) -> Predictor:
        return cls(load_source(path), device, **kwargs)

    def _candidate_runtime(self, loaded: Loaded, fp32: TorchRuntime, channels_last: str,
                           compile: str) -> Runtime:
        """The auto candidate beside the fp32 runtime, from a copy of the fp32 eager model when there
        is one (batch-norm is folded once), else from a copy of the checkpoint's model (the runtime
        converts its model in place, and the fp32 one must stay as it is)."""
        assert self.candidate is not None
        source = fp32.model if compile == "off" and isinstance(fp32.model, torch.nn.Module) else None
        copied = dataclasses.replace(loaded, model=copy.deepcopy(source or loaded.model))
        rt = TorchRuntime(copied, self.device, precision=self.candidate, channels_last=channels_last,
                          compile=compile, fold_bn=source is None and fp32.folded_bn)
        rt.folded_bn = fp32.folded_bn
        return rt

    def _folded_fp32(self) -> torch.nn.Module | None:
        """The torch runtime's model where it is the fp32 one with batch-norm folded: the export
        starts from it instead of folding the checkpoint a second time."""
        model = self.runtime.model
        fp32 = self.runtime.precision == "fp32"
        return model if isinstance(model, torch.nn.Module) and self.runtime.folded_bn and fp32 else None

    def build_deferred_candidate(self) -> bool:
        """Export and build --runtime auto's candidate; True when there is one to time. A first start
        calls it after ready, on a thread beside serving: the export traces the served torch model,
        which is safe beside its eager forward passes (the tracer's state is per thread)."""
        if self._deferred is None:
            return False
        loaded, name, fold_bn, cache_dir, folded = self._deferred
        self._deferred = None  # the folded fp32 model (held for the export) is freed with it
        self.runtime_choice = self._runtime_candidate(loaded, name, fold_bn, cache_dir, folded)
        return self.runtime_candidate is not None

    @property
    def choice_key(self) -> str | None:
        """The --runtime auto decision's key (runtime_choice.machine_key); None without a candidate."""
        return self._choice_key

    @property
    def runtime_pending(self) -> bool:
        """A --runtime auto candidate still to build or to time: torch serves meanwhile."""
        return self._deferred is not None or self.runtime_candidate is not None

    def _runtime_candidate(self, loaded: Loaded | OnnxArtifact, name: str, fold_bn: bool,
                           cache_dir: Path | None, folded: torch.nn.Module | None) -> runtime_choice.Choice:
        """Build --runtime auto's candidate beside torch. One that fails to export or to match torch
        on the probe batch is not fatal: torch serves, and says why."""
        try:
            rt = build_runtime(name, loaded, self.device, sha256=self.sha256, fold_bn=fold_bn,
                               cache_dir=cache_dir, folded=folded)
        except Exception as e:  # any export or session failure: an optional speed-up, not a reason to stop
            why = f"auto: torch, {name} could not run the model ({e})"
            choice = runtime_choice.Choice("auto", "torch", why)
            log.warning("runtime %s", choice.reason)
            return choice
        self._runtimes[name] = rt
        self.runtime_candidate = name
        return runtime_choice.pending(name)

    def use(self, variant: str) -> None:
        """Run with one of the runtimes built (auto: fp32 and the candidates) from now on."""
        rt = self._runtimes[variant]
        self.runtime, self.precision, self.dtype, self.model = rt, rt.precision, rt.input_dtype, rt.model
        self.variant = variant

    def settle(self, choice: Choice) -> None:
        """Keep the chosen precision's runtime only (auto's decision), and say why in /v1/model; a
        runtime candidate not yet timed stays."""
        self.use(choice.precision)
        kept = {choice.precision: self.runtime}
        if self.runtime_candidate is not None:
            kept[self.runtime_candidate] = self._runtimes[self.runtime_candidate]
        self._runtimes = kept
        self.candidate = None
        self.precision_choice = choice

    def settle_runtime(self, choice: runtime_choice.Choice, keep: bool = True) -> None:
        """Keep the chosen runtime only (--runtime auto's decision): the other one's memory (a
        resnet18's weights, an ONNX Runtime session) is freed. `keep`: write the decision down for
        later starts on this kind of machine."""
        assert self.runtime_candidate is not None
        served = self.runtime_candidate if choice.runtime == self.runtime_candidate else next(
            v for v in self._runtimes if v != self.runtime_candidate)
        self.use(served)
        self._runtimes = {served: self.runtime}
        self.runtime_candidate = None
        self.runtime_choice = choice
        self.folded_bn = self.runtime.folded_bn
        self.channels_last = getattr(self.runtime, "channels_last", False)
        if keep and self._choice_key is not None and choice.measured is not None:  # the next start reads it
            runtime_choice.remember(self.path, self.sha256, self._cache_dir, self._choice_key, choice)
        if self.precision_choice.precision != self.precision:  # torch bf16 lost to an fp32 runtime
            self.precision_choice = Choice(self.precision_choice.setting, self.precision,
                                           f"{self.precision} ({choice.runtime} runs fp32; {choice.reason})")

    def top1(self, images: torch.Tensor, precision: str) -> torch.Tensor:
        """Top-1 class of (N, C, H, W) uint8 images at one of the built precisions; leaves that one on."""
        self.use(precision)
        return self.forward(list(images)).argmax(dim=1)

    # ---- the hot path (inference thread only) -------------------------------------------------------
    def _to_device(self, images: list[torch.Tensor]) -> torch.Tensor:
        if not self._cuda:
            return torch.stack(images)  # (B, C, H, W) uint8
        n = len(images)
        if n <= self._pinned.shape[0]:
            host = torch.stack(images, out=self._pinned[:n])
        else:  # a warm-up or reload larger than the configured batch
            host = torch.stack(images).pin_memory()
        with torch.cuda.stream(self._copy_stream):
            batch = host.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        batch.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(C, H, W) uint8 tensors -> (B, classes) float32 probabilities on the CPU."""
        if self.buckets:
            n, size = len(images), bucket(len(images), self.buckets)
            if n > size:  # larger than any bucket: run it in bucket-sized pieces
                return torch.cat([self.forward(images[i : i + size]) for i in range(0, n, size)])
            if n < size:  # zero images fill the bucket; their rows are dropped below
                return self._forward([*images, *[self._blank] * (size - n)])[:n]
        return self._forward(images)

    def _forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            if any(img.dtype != torch.uint8 for img in images):
                x = self._prenormalised(images)
            else:
                batch = self._to_device(images)
                x = self.preprocess.normalize(batch, self.dtype)  # (B, C, H, W) on the device
            logits = self.runtime.run(x)  # the runtime applies channels_last where it uses it
            # .cpu() synchronises with the device, so the pinned buffer is free again afterwards.
            return self.probabilities(logits).cpu()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> the probabilities this service answers with: softmax of logits / T when the
        checkpoint is calibrated (temperature scaling: same ranking, honest confidence)."""
        logits = logits.float()
        if self.temperature is not None:
            logits = logits / self.temperature
        return logits.softmax(dim=-1)

    def _prenormalised(self, images: list[torch.Tensor]) -> torch.Tensor:
        """A batch holding client-preprocessed float tensors: normalise only the uint8 ones (rare path,
        so no pinned staging buffer)."""
        rows = [img if img.dtype != torch.uint8 else self.preprocess.normalize(img) for img in images]
        return torch.stack(rows).to(self.device, self.dtype)

    def run(self, jobs: list[Job]) -> list[JobResult | NonFiniteOutput]:
        """One result per job, in order; a job whose probabilities are not finite gets NonFiniteOutput
        (never a NaN in a JSON answer or in the confidence metrics)."""
        start = time.perf_counter()
        probs = self.forward([j.image for j in jobs])  # (B, classes)
        inference_s = time.perf_counter() - start
        k = max(j.top_k for j in jobs)
        top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
        top_p_rows, top_i_rows = top_p.tolist(), top_i.tolist()
        finite = torch.isfinite(probs).all(dim=1).tolist()
        labels = self.labels
        results: list[JobResult | NonFiniteOutput] = []
        for row, (job, ps, idx) in enumerate(zip(jobs, top_p_rows, top_i_rows, strict=True)):
            if not finite[row]:
                message = f"{self.name} ({self.precision}) produced NaN/inf probabilities"
                results.append(NonFiniteOutput(message))
                continue
            preds = [
                {"label": labels[i], "index": i, "probability": p}
                for p, i in zip(ps[: job.top_k], idx[: job.top_k], strict=True)
            ]
            results.append(
                JobResult(
                    predictions=preds,
                    probabilities=probs[row].tolist() if job.all_probs else None,
                    queue_s=start - job.enqueued,
                    inference_s=inference_s,
                    batch_size=len(jobs),
                    top1_label=labels[idx[0]],
                    top1_probability=ps[0],
                    model=self.ref,
                )
            )
        return results

    # ---- set-up ---------------------------------------------------------------------------------------
    def warmup(self, sizes: list[int], stop: threading.Event | None = None) -> float:
        """Run each batch size once (allocator, cuDNN/oneDNN algorithm choice, trace/compile graphs)
        and make them the batch buckets; returns seconds. Raises WarmupStopped when `stop` is set
        between two sizes (SIGTERM during start-up)."""
        start = time.perf_counter()
        if self.compile != "off":
            allow_graphs(len(sizes))
        for n in sizes:
            if stop is not None and stop.is_set():
                raise WarmupStopped("warm-up stopped: the service is shutting down")
            self.run_blank(n)
        if self.compile != "off":
            self.buckets = sorted(set(sizes))
        return time.perf_counter() - start

    @property
    def eager_cpu(self) -> bool:
        """The eager torch model, or ONNX Runtime, on the CPU: nothing is compiled, traced or autotuned
        per batch size, so a size never run before costs little more the first time (resnet18: ~15
        ms on 60-540 ms in torch; onnxruntime's first batch of 16 took 1.0x its second, Zen 3)."""
        eager = self.runtime.name in ("torch", "onnxruntime")
        return self.device.type == "cpu" and self.compile == "off" and eager

    def run_blank(self, n: int) -> None:
        """One blank batch of n through the model, checked for NaN/inf; leaves the buckets alone."""
        probs = self._forward([self._blank] * n)
        if not torch.isfinite(probs).all():
            raise CheckpointError(f"{self.path}: the model produced NaN/inf on a blank warm-up batch")
        if self._cuda:  # only the stream this warm-up runs on (a reload's own): live batches go on
            torch.cuda.current_stream(self.device).synchronize()

    def release_memory(self) -> None:
        """Inference thread, between batches: the served runtime gives back what it keeps for reuse."""
        self.runtime.release_memory()

    def model_ref(self) -> dict[str, str]:
        return dict(self.ref)

    def describe(self) -> dict[str, Any]:
        c, h, w = self.input_shape
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.meta.arch,
            "num_classes": len(self.labels),
            "classes": self.labels,
            "input_size": {"channels": c, "height": h, "width": w},
            "preprocessing": self.preprocess.to_dict(),
            "checkpoint": {
                "path": str(self.path),
                "sha256": self.sha256,
                "weights_sha256": self.meta.weights_sha256,
                "format_version": self.meta.format_version,
            },
            "training": self.meta.training,
            "device": str(self.device),
            "precision": self.precision,
            "precision_choice": self.precision_choice.describe(),
            "runtime": {
                "name": self.runtime.name, "version": self.runtime.version, **self.runtime.describe()
            },
            "runtime_choice": self.runtime_choice.describe(),
            "channels_last": self.channels_last,
            "compile": self.compile,
            "batchnorm_folded": self.folded_bn,
            "calibration": self.calibration_info(),
        }

    def calibration_info(self) -> dict[str, Any]:
        """What /v1/model says about calibration: whether a temperature is applied, and the stored
        record (fitted temperature, ECE before/after, reliability bins; docs/calibration.md)."""
        stored = self.meta.calibration
        if self.temperature is not None:
            reason = "the checkpoint's temperature divides the logits before the softmax"
        elif stored.get("temperature"):
            reason = "disabled by --no-calibration: raw softmax"
        else:
            reason = "the checkpoint has no temperature: raw softmax"
        return {**stored, "applied": self.temperature is not None, "temperature": stored.get("temperature"),
                "reason": reason}


def _temperature(loaded: Loaded | OnnxArtifact, calibration: bool) -> float | None:
    """The temperature to divide logits by, or None (not asked for, or not in the checkpoint)."""
    stored = loaded.meta.calibration.get("temperature")
    if not calibration or stored is None:
        return None
    if isinstance(stored, bool) or not isinstance(stored, int | float) or not 0 < stored < float("inf"):
        raise CheckpointError(f"{loaded.path}: calibration temperature {stored!r} is not a positive number")
    return float(stored)
