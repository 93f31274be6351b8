"""`python -m bench backends`: torch fp32/bf16, onnxruntime and openvino fp32 and int8, side by side.

Per model: model-only images/s at the service's batch sizes (1 and --max-batch-size) through the
service's own Predictor on pre-decoded images, in alternating rounds, as ratios to torch fp32; the
share of the machine's measured peak for that precision (a 2048x2048 matmul in fp32, bf16 and int8 on
the same threads, in the same run); top-1 agreement with torch fp32 on the benchmark images (the int8
files are calibrated on the other half of them); then through the service at 16 clients, with each
backend's cold start and idle RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.inputs import generate
from bench.loadgen import build_request, load
from bench.peak import peak_gflops
from bench.servers import service_server

log = logging.getLogger(__name__)
VARIANTS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
            ("onnxruntime", "int8"), ("openvino", "int8")]
ARCHS = {"convnet": "small64", "resnet18": "photo640", "mobilenet_v3_small": "photo640"}
HOST = "127.0.0.1"


def model_gflop(model: torch.nn.Module, shape: tuple[int, int, int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() / 1e9


def prepare(arch: str, workdir: Path, bodies: list[bytes], trained: Path | None) -> dict[str, Any]:
    """Checkpoint, decoded images (uint8), and an int8 file calibrated on the first half of them."""
    from bench.run import make_checkpoint
    from model.checkpoint import load_checkpoint
    from model.onnx_file import artifact_props, set_metadata
    from service.decode import decode_to_tensor
    from training.onnx_export import BatchReader, file_sha256, quantize_graph

    ckpt = trained if arch == "convnet" and trained else None
    ckpt = ckpt or make_checkpoint(arch, 1000, workdir / f"{arch}.safetensors")
    loaded = load_checkpoint(ckpt)
    pre = loaded.preprocess
    images = [decode_to_tensor(b, pre, 50_000_000) for b in bodies]
    half = len(images) // 2
    calib = [pre.normalize(torch.stack(images[i : i + 8])) for i in range(0, half, 8)]
    int8 = workdir / f"{ckpt.stem}-{arch}.int8.onnx"
    graph = quantize_graph(loaded.model, pre.input_shape, BatchReader(calib))
    probe = torch.stack(images[:3])
    props = artifact_props(file_sha256(ckpt), "int8", loaded.model, pre, probe)
    int8.write_bytes(set_metadata(graph, loaded.meta, props))
    return {"checkpoint": ckpt, "int8": int8, "images": images, "eval": images[half:],
            "gflop": model_gflop(loaded.model, pre.input_shape)}


def model_only(arch: str, prep: dict[str, Any], sizes: list[int], threads: int, rounds: int,
               peaks: dict[str, float]) -> list[dict[str, Any]]:
    from service.predictor import Predictor

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    predictors = {}
    for runtime, precision in VARIANTS:
        path = prep["int8"] if precision == "int8" else prep["checkpoint"]
        p = Predictor.load(path, cpu, runtime=runtime, precision="bf16" if precision == "bf16" else "fp32")
        p.warmup(sizes)
        predictors[(runtime, precision)] = p
    reference = predictors[("torch", "fp32")].forward(prep["eval"]).argmax(dim=1)
    rates: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(rounds):
        for b in sizes:
            batch = (prep["images"] * (b // len(prep["images"]) + 1))[:b]
            reps = max(2, 32 // b)
            for key, p in predictors.items():  # alternating: every variant once per round
                start = time.perf_counter()
                for _ in range(reps):
                    p.forward(batch)
                rates.setdefault((*key, b), []).append(reps * b / (time.perf_counter() - start))
    rows = []
    for (runtime, precision), p in predictors.items():
        agree = float((p.forward(prep["eval"]).argmax(dim=1) == reference).float().mean())
        for b in sizes:
            ips = statistics.median(rates[(runtime, precision, b)])
            base = statistics.median(rates[("torch", "fp32", b)])
            rows.append({"arch": arch, "runtime": runtime, "precision": precision, "batch": b,
                         "images_per_s": ips, "vs_torch_fp32": ips / base,
                         "peak_share": ips * prep["gflop"] / peaks[precision], "top1_agreement": agree})
    return rows


def through_service(arch: str, prep: dict[str, Any], bodies: list[bytes], workdir: Path, clients: int,
                    requests: int, threads: int, max_batch: int) -> list[dict[str, Any]]:
    rows = []
    for runtime, precision in VARIANTS:
        path = prep["int8"] if precision == "int8" else prep["checkpoint"]
        settings = {"runtime": runtime, "precision": "bf16" if precision == "bf16" else "fp32",
                    "max_batch_size": str(max_batch), "export_cache_dir": str(workdir / "cache")}
        if threads:
            settings["torch_threads"] = str(threads)
        with service_server(path, settings, workdir, name=f"{arch}-{runtime}-{precision}") as server:
            reqs = [build_request(HOST, server.port, "/v1/predict", b, "image/jpeg") for b in bodies]
            load(HOST, server.port, reqs, clients, clients * 2)  # warm the connections
            result = load(HOST, server.port, reqs, clients, requests)
            rows.append({"arch": arch, "runtime": runtime, "precision": precision, "clients": clients,
                         "rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                         "errors": result.errors, "cold_start_s": server.cold_start_s,
                         "idle_rss_mb": server.idle_rss_mb})
    base = next(r["rps"] for r in rows if r["runtime"] == "torch" and r["precision"] == "fp32")
    for r in rows:
        r["vs_torch_fp32"] = r["rps"] / base
    return rows


def render(result: dict[str, Any]) -> str:
    peaks = result["peak_gflops"]
    lines = [
        f"command: `{result['command']}`", f"CPU: {result['cpu']}, {result['threads']} thread(s); "
        f"peak matmul 2048^3: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f}, int8 {peaks['int8']:.0f} "
        "GFLOP/s (GOP/s) in the same run. Shared machine: numbers are indicative only.", "",
        "| model | runtime | precision | batch | images/s | x torch fp32 | share of peak | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cells = ("arch", "runtime", "precision", "batch")
    for r in result["model_only"]:
        lines.append("| " + " | ".join(str(r[k]) for k in cells) + f" | {r['images_per_s']:.1f} "
                     f"| {r['vs_torch_fp32']:.2f} | {100 * r['peak_share']:.0f}% "
                     f"| {100 * r['top1_agreement']:.1f}% |")
    if result["service"]:
        lines += ["", "| model | runtime | precision | clients | req/s | x torch fp32 | p50 ms | p99 ms "
                  "| errors | cold start s | idle RSS MiB |", "|---" * 11 + "|"]
        cells = ("arch", "runtime", "precision", "clients")
        for r in result["service"]:
            lines.append("| " + " | ".join(str(r[k]) for k in cells) + f" | {r['rps']:.1f} "
                         f"| {r['vs_torch_fp32']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                         f"| {r['errors']} | {r['cold_start_s']:.1f} | {r['idle_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated models")
    p.add_argument("--threads", type=int, default=0, help="model-only threads (0: every usable core)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=96, help="per backend through the service (0: skip)")
    p.add_argument("--trained-checkpoint", type=Path, help="a trained convnet (default: random weights)")


def run(args: argparse.Namespace, workdir: Path, command: str) -> dict[str, Any]:
    from bench.report import machine_info
    from service.settings import usable_cores

    threads = args.threads or usable_cores()
    sets = generate(args.inputs or workdir / "inputs", args.seed, quick=False)
    peaks = peak_gflops(threads)
    sizes = sorted({1, args.max_batch_size})
    result: dict[str, Any] = {"command": command, "cpu": machine_info().get("cpu", "?"), "threads": threads,
                              "peak_gflops": peaks, "model_only": [], "service": []}
    for arch in args.archs.split(","):
        bodies = sets[ARCHS[arch]].load()
        prep = prepare(arch, workdir, bodies, args.trained_checkpoint)
        result["model_only"] += model_only(arch, prep, sizes, threads, args.rounds, peaks)
        if args.requests:
            result["service"] += through_service(arch, prep, bodies, workdir, args.clients, args.requests,
                                                 args.torch_threads, args.max_batch_size)
        log.info("%s done", arch)
    args.out.write_text(render(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    return result
