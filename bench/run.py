"""`python -m bench`: every scenario, the in-process bounds, precision/compile modes, one report.

Per scenario: the in-process bound runs first (alone on the machine), then the service and the
baseline are started side by side (each on its own free port; the idle one costs nothing) and
measured alternately for `rounds` rounds at each concurrency level. The precision/compile comparison
runs the fp32, bf16 and compiled services the same way, and checks their answers against fp32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import inputs, precision
from bench.inputs import ImageSet
from bench.loadgen import build_request
from bench.measure import (
    HOST,
    PREDICT,
    Summary,
    alternate,
    combine_bounds,
    in_process_bound,
    machine_peak,
    measure_once,
    summarise,
)
from bench.servers import REPO, Server, baseline_server, http_get, service_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    arch: str
    num_classes: int
    image_set: str
    requests_at: dict[int, int]  # concurrency -> requests per measured run
    bound_count: int  # images through the in-process bound per repeat
    # Extra back-to-back (in-process bound, service at 16 clients) pairs after the rounds, for the
    # 90%-of-bound target: one run of either varies by 10-15 % on a shared 2-core machine, so five
    # rounds leave the median ratio several points either way (docs/benchmarks.md, issue 10).
    bound_pairs: int = 0
    pair_clients: int = 16  # the clients of those pairs' service runs


FULL = [
    Scenario("resnet18-640", "resnet18 (224x224), 640x480 JPEGs", "resnet18", 1000, "photo640",
             {1: 48, 16: 256, 64: 128}, 256, bound_pairs=8),  # 16 clients: the 90%-of-bound target
    Scenario("mobilenet-640", "mobilenet_v3_small (224x224), 640x480 JPEGs", "mobilenet_v3_small", 1000,
             "photo640", {1: 80, 16: 320, 64: 320}, 320),
    Scenario("resnet18-4000", "resnet18 (224x224), 4000x3000 JPEGs", "resnet18", 1000, "phone4000",
             {1: 6, 16: 32}, 32),
    Scenario("convnet-64", "convnet (default small model, 64x64), 64x64 JPEGs", "convnet", 10, "small64",
             {1: 200, 16: 1000, 32: 1000, 64: 1000}, 1000),
]
QUICK = [
    Scenario("convnet-64", "convnet (default small model, 64x64), 64x64 JPEGs", "convnet", 10, "small64",
             {1: 16, 4: 32}, 64, bound_pairs=1, pair_clients=4),
]
# (key, concurrency, requests, modes) for the precision/compile comparison. torch.compile of resnet18
# costs minutes of start-up per batch bucket on 2 cores, so it is compared on the small model only.
VARIANT_LOADS = [("modes-convnet", 32, 1000, ("fp32", "bf16", "trace", "compile")),
                 ("modes-resnet18", 16, 128, ("fp32", "bf16", "trace"))]
MODES: dict[str, dict[str, str]] = {
    "fp32": {"runtime": "torch"},  # the reference: torch fp32 (the default, auto, may serve onnxruntime)
    "bf16": {"precision": "bf16"},
    "trace": {"compile": "trace"},
    "compile": {"compile": "compile"},
}


@dataclass
class BenchSettings:
    """What both servers and the in-process bound are given. 0 means the service's own default."""

    torch_threads: int = 0
    decode_threads: int = 0
    max_batch_size: int = 16
    batch_wait_ms: float | None = None
    rounds: int = 3
    scale: float = 1.0  # multiplies every request count
    extra_env: dict[str, str] = field(default_factory=dict)
    # One resolved device (cpu or cuda:N) for the service, the baseline and the in-process bound, so
    # a GPU host never compares a CUDA service with a CPU baseline.
    device: str = "cpu"

    def service_env(self, **more: str) -> dict[str, str]:
        env: dict[str, str] = {"max_batch_size": str(self.max_batch_size), "device": self.device}
        if self.torch_threads:
            env["torch_threads"] = str(self.torch_threads)
        if self.decode_threads:
            env["decode_threads"] = str(self.decode_threads)
        if self.batch_wait_ms is not None:
            env["max_batch_wait_ms"] = str(self.batch_wait_ms)
        return {**env, **self.extra_env, **more}

    @property
    def resolved_decode_threads(self) -> int:
        return self.decode_threads or os.cpu_count() or 1

    @property
    def bound_torch_threads(self) -> int:
        """The service's batch thread count before warm-up timing (cores - 1, one core left to decoding);
        the bound uses what the running service reports instead (service_threads)."""
        return self.torch_threads or max(1, (os.cpu_count() or 1) - 1)

    def scaled(self, requests_at: dict[int, int]) -> dict[int, int]:
        return {c: max(c, round(n * self.scale)) for c, n in requests_at.items()}


def make_checkpoint(arch: str, num_classes: int, out: Path) -> Path:
    """A serving checkpoint with random weights: `python -m training export`, else written directly."""
    if out.is_file():
        return out
    cmd = [sys.executable, "-m", "training", "export", "--arch", arch, "--num-classes", str(num_classes),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode == 0 and out.is_file():
        return out
    log.warning("training export failed (%s); writing the checkpoint directly", proc.stderr.strip()[-300:])
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.registry import build_model, default_preprocess

    pre = default_preprocess(arch)
    model = build_model(arch, num_classes, pre.channels, pre.size)
    meta = CheckpointMeta(arch=arch, labels=[f"class_{i}" for i in range(num_classes)],
                          preprocess=pre.to_dict(), name=arch)
    save_checkpoint(out, model, meta)
    return out


def _start_all(servers: list[Server]) -> list[Server]:
    started: list[Server] = []
    try:
        for s in servers:  # one at a time: cold start is measured without a neighbour starting too
            started.append(s.start())
    except Exception:
        for s in started:
            s.stop()
        raise
    return started


def _server_info(s: Server) -> dict[str, Any]:
    return {"cold_start_s": s.cold_start_s, "idle_rss_mb": s.idle_rss_mb}


def run_scenario(sc: Scenario, sets: dict[str, ImageSet], ckpt: Path, bs: BenchSettings,
                 logs: Path) -> dict[str, Any]:
    log.info("== %s", sc.title)
    images = sets[sc.image_set]
    requests_at = bs.scaled(sc.requests_at)
    bounds: list[dict[str, Any]] = []

    servers = _start_all([service_server(ckpt, bs.service_env(), logs),
                          baseline_server(ckpt, bs.torch_threads, logs, bs.device)])
    try:
        model_info = http_get(servers[0].port, "/v1/model")[1].decode(errors="replace")

        def measure_bound() -> dict[str, Any]:
            # The bound runs batches with the thread count the service uses now: warm-up's choice,
            # which the service re-checks on its real batches (service/thread_tuner.py).
            info = http_get(servers[0].port, "/v1/model")[1].decode(errors="replace")
            threads = service_threads(info, bs.bound_torch_threads)
            # Where the share of the bound is a target, also the closed loop of the pairs' clients:
            # the service's batching without HTTP, which tells the HTTP cost from the clients' limit.
            # The runtime too is the service's (--runtime auto may serve onnxruntime).
            return in_process_bound(ckpt, images.paths[0].parent, max(16, round(sc.bound_count * bs.scale)),
                                    bs.max_batch_size, bs.resolved_decode_threads, threads, device=bs.device,
                                    clients=sc.pair_clients if sc.bound_pairs else 0,
                                    onnx=service_onnx_file(info))

        def bound_round(rnd: int) -> None:  # every round, so the bound sees the machine the servers see
            bounds.append(measure_bound())

        runs = alternate(servers, images.load(), "image/jpeg", requests_at, bs.rounds, bound_round)
        clients = sc.pair_clients
        pairs = bound_pairs(servers[0], images.load(), clients, requests_at.get(clients, 0), sc.bound_pairs,
                            measure_bound)
    finally:
        for s in servers:
            s.stop()
    bound = combine_bounds(bounds)
    # The physical limit, alone on the machine like the bound: GEMM peak on the service's batch
    # threads, and the model's work per image (bench/peak.py). Skipped on CUDA (a CPU GEMM says
    # nothing about a GPU).
    threads = bounds[-1]["torch_threads"] if bounds else service_threads(model_info, bs.bound_torch_threads)
    peak = machine_peak(ckpt, threads, repeats=3 if bs.rounds <= 1 else 5) if bs.device == "cpu" else None
    return {
        "title": sc.title,
        "arch": sc.arch,
        "image_set": sc.image_set,
        "image_mean_kib": images.mean_bytes / 1024,
        "requests_at": requests_at,
        "bound": bound,
        "bound_pairs": {"clients": clients, "pairs": pairs},
        "peak": peak,
        "service_precision": service_precision(model_info),
        "service_runtime_choice": model_field(model_info, "runtime_choice", "reason") or "",
        "servers": {s.name: _server_info(s) for s in servers},
        "service_model": model_info,
        "summaries": [dataclasses.asdict(summarise(name, c, rs))
                      for name, by_c in runs.items() for c, rs in by_c.items()],
        "runs": [r.to_dict() for by_c in runs.values() for rs in by_c.values() for r in rs],
    }


def bound_pairs(service: Server, bodies: list[bytes], clients: int, total: int, count: int,
                bound: Callable[[], dict[str, Any]]) -> list[dict[str, float]]:
    """`count` pairs of (bound, service at `clients` clients, `total` requests) run back to back,
    which goes first swapped each pair so that drift on the machine cancels:
    [{"bound": images/s, "service": req/s, "closed_loop": the bound's closed loop, images/s}]."""
    if not total:
        return []
    prebuilt = [build_request(HOST, service.port, PREDICT, b, "image/jpeg") for b in bodies]
    pairs: list[dict[str, float]] = []

    def served() -> float:
        return measure_once(service, prebuilt, clients, total, -1, min(total, 2 * clients)).result.rps

    for k in range(count):
        log.info("bound pair %d/%d", k + 1, count)
        if k % 2 == 0:
            b = bound()
            rps = served()
        else:
            rps = served()
            b = bound()
        pairs.append({"bound": b["images_per_s"], "service": rps,
                      "closed_loop": b.get("closed_loop_per_s", float("nan"))})
    return pairs


def model_field(model_info: str, *keys: str) -> Any:
    """One field of a service's /v1/model answer (`keys`: the path into it), None where it is missing
    or the answer is not JSON."""
    try:
        value: Any = json.loads(model_info)
        for key in keys:
            value = value[key]
    except (ValueError, KeyError, TypeError):
        return None
    return value


def service_threads(model_info: str, fallback: int) -> int:
    """The batch thread count a running service reports in /v1/model (fallback: its auto rule)."""
    try:
        return int(model_field(model_info, "serving", "torch_threads", "batch"))
    except (ValueError, TypeError):
        log.warning("/v1/model has no serving.torch_threads; the bound uses %d thread(s)", fallback)
        return fallback


def service_onnx_file(model_info: str) -> str | None:
    """The exported file a running service serves with ONNX Runtime, or None (it serves torch)."""
    runtime = model_field(model_info, "runtime")
    if isinstance(runtime, dict) and runtime.get("name") == "onnxruntime":
        return str(runtime["onnx_file"])
    return None


def service_precision(model_info: str) -> str:
    """The precision the running service serves (--precision auto: what it chose), fp32 if unknown."""
    precision = model_field(model_info, "precision")
    return "fp32" if precision is None else str(precision)


def runnable_modes(
    modes: tuple[str, ...], device: str, bf16_flags: list[str] | None = None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The modes worth running here, and why the others are not. bf16 on a CPU without bf16
    hardware is torch's scalar fallback (AMD EPYC Zen 3: 1.3 GFLOP/s, so resnet18's 128 requests
    would take many minutes), and `--precision auto` never picks it there."""
    from service.cpu_flags import NO_BF16, cpu_bf16_flags  # torch-free: this process must not load torch

    flags = cpu_bf16_flags() if bf16_flags is None else bf16_flags
    if "bf16" in modes and device == "cpu" and not flags:
        return tuple(m for m in modes if m != "bf16"), {"bf16": NO_BF16}
    return modes, {}


def run_variants(key: str, ckpt: Path, sets: dict[str, ImageSet], image_set: str, concurrency: int,
                 total: int, modes: tuple[str, ...], bs: BenchSettings, logs: Path) -> dict[str, Any]:
    """fp32 vs bf16 vs torch.compile services on one model: throughput, and agreement with fp32."""
    log.info("== precision/compile: %s", key)
    images = sets[image_set]
    modes, skipped = runnable_modes(modes, bs.device)
    for name, why in skipped.items():
        log.info("  %s skipped: %s", name, why)
    variants = {m: MODES[m] for m in modes}
    servers = _start_all([service_server(ckpt, bs.service_env(**extra), logs, name=name)
                          for name, extra in variants.items()])
    try:
        out: dict[str, Any] = {"key": key, "concurrency": concurrency, "skipped": skipped,
                               "servers": {s.name: _server_info(s) for s in servers}}
        if len(variants) > 1:
            bodies = images.load()
            probs = {s.name: precision.probabilities(s, bodies) for s in servers}
            out["agreement"] = [dataclasses.asdict(precision.compare(name, probs["fp32"], probs[name]))
                                for name in variants if name != "fp32"]
        runs = alternate(servers, images.load(), "image/jpeg", bs.scaled({concurrency: total}), bs.rounds)
    finally:
        for s in servers:
            s.stop()
    out["summaries"] = [dataclasses.asdict(summarise(n, c, rs)) for n, by_c in runs.items()
                        for c, rs in by_c.items()]
    return out


def trained_checkpoint(explicit: Path | None, workdir: Path) -> Path | None:
    """A trained default-architecture model: given, or runs/default, or trained here (~2 min) with
    `python -m training train` on 64x64 crops labelled by the sample photo they come from."""
    for cand in (explicit, REPO / "runs" / "default" / "model.safetensors"):
        if cand is not None and cand.is_file():
            return cand
    data = inputs.classification_folder(workdir / "photo-classes")
    out = workdir / "trained"
    cmd = [sys.executable, "-m", "training", "train", "--data", f"folder:{data}", "--epochs", "4",
           "--out", str(out), "--no-progress"]
    log.info("no trained checkpoint given; training one: %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    path = out / "model.safetensors"
    if proc.returncode != 0 or not path.is_file():
        log.warning("training failed, agreement is skipped: %s", proc.stderr.strip()[-500:])
        return None
    log.info("trained: %s", proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else path)
    return path


def _describe_trained(path: Path) -> dict[str, Any]:
    from model.checkpoint import read_meta

    meta = read_meta(path)
    best = meta.training.get("best_val") or {}
    return {"path": str(path), "arch": meta.arch, "classes": len(meta.labels),
            "data": str(meta.training.get("data", "?")), "val_top1": best.get("top1")}


def run_all(sets: dict[str, ImageSet], workdir: Path, bs: BenchSettings, quick: bool,
            only: list[str] | None, trained: Path | None, variants: bool) -> dict[str, Any]:
    logs = workdir / "logs"
    ckpts = workdir / "checkpoints"
    started = time.perf_counter()
    results: dict[str, Any] = {"scenarios": {}, "variants": []}
    for sc in QUICK if quick else FULL:
        if only and sc.key not in only:
            continue
        ckpt = make_checkpoint(sc.arch, sc.num_classes, ckpts / f"{sc.arch}.safetensors")
        results["scenarios"][sc.key] = run_scenario(sc, sets, ckpt, bs, logs)
    if variants and not quick:
        for key, conc, total, modes in VARIANT_LOADS:
            if only and key not in only:
                continue
            if key == "modes-convnet":
                ckpt_t = trained_checkpoint(trained, workdir)
                if ckpt_t is None:
                    continue
                results["trained_checkpoint"] = _describe_trained(ckpt_t)
                results["variants"].append(run_variants(key, ckpt_t, sets, "small64", conc, total, modes,
                                                        bs, logs))
            else:
                ckpt = make_checkpoint("resnet18", 1000, ckpts / "resnet18.safetensors")
                results["variants"].append(run_variants(key, ckpt, sets, "photo640", conc, total, modes,
                                                        bs, logs))
    results["wall_s"] = time.perf_counter() - started
    return results


def summaries(result: dict[str, Any]) -> list[Summary]:
    return [Summary(**s) for s in result["summaries"]]
