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
import contextlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.backend_worker import Worker, WorkerProcess
from bench.image_size import backend_sizes
from bench.inputs import generate
from bench.loadgen import build_request, load
from bench.peak import gflop_per_image, peak_gflops
from bench.servers import service_server

log = logging.getLogger(__name__)
VARIANTS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
            ("onnxruntime", "int8"), ("openvino", "int8")]
ARCHS = {"convnet": "small64", "resnet18": "photo640", "mobilenet_v3_small": "photo640"}
HOST = "127.0.0.1"
PRECISIONS = ("fp32", "bf16", "int8")
K = TypeVar("K")  # what names a variant


def runnable_variants(
    bf16_flags: list[str] | None = None,
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The variants worth running on this CPU, and why the others are not: torch bf16 without bf16
    hardware is torch's scalar fallback (AMD EPYC Zen 3: resnet18 at a few images per minute), which
    nobody would serve and `--precision auto` never picks (bench.run.runnable_modes, for the modes)."""
    from service.cpu_flags import NO_BF16, cpu_bf16_flags  # torch-free, like the rest of this parent process

    flags = cpu_bf16_flags() if bf16_flags is None else bf16_flags
    if flags:
        return list(VARIANTS), {}
    return [v for v in VARIANTS if v != ("torch", "bf16")], {"torch bf16": NO_BF16}


def bench_images(arch: str, workdir: Path, bodies: list[bytes], trained: Path | None) -> dict[str, Any]:
    """Checkpoint (a trained convnet, else random weights), its Loaded, the decoded images (uint8),
    the second half of them for agreement and float batches of the first half to calibrate on."""
    from bench.run import make_checkpoint
    from model.checkpoint import load_checkpoint
    from service.decode import decode_to_tensor

    ckpt = trained if arch == "convnet" and trained else None
    ckpt = ckpt or make_checkpoint(arch, 1000, workdir / f"{arch}.safetensors")
    loaded = load_checkpoint(ckpt)
    pre = loaded.preprocess
    images = [decode_to_tensor(b, pre, 50_000_000) for b in bodies]
    half = len(images) // 2
    calib = [pre.normalize(torch.stack(images[i : i + 8])) for i in range(0, half, 8)]
    return {"checkpoint": ckpt, "loaded": loaded, "images": images, "eval": images[half:], "calib": calib}


def prepare(arch: str, workdir: Path, bodies: list[bytes], trained: Path | None) -> dict[str, Any]:
    """bench_images, and an int8 file calibrated on the first half of the images."""
    from model.onnx_file import artifact_props, set_metadata
    from training.onnx_export import BatchReader, file_sha256, quantize_graph

    prep = bench_images(arch, workdir, bodies, trained)
    ckpt, loaded, images = prep["checkpoint"], prep["loaded"], prep["images"]
    pre = loaded.preprocess
    int8 = workdir / f"{ckpt.stem}-{arch}.int8.onnx"
    graph = quantize_graph(loaded.model, pre.input_shape, BatchReader(prep["calib"]))
    probe = torch.stack(images[:3])
    props = artifact_props(file_sha256(ckpt), "int8", loaded.model, pre, probe)
    int8.write_bytes(set_metadata(graph, loaded.meta, props))
    return {**prep, "int8": int8, "gflop": gflop_per_image(loaded.model, pre.input_shape)}


def alternate(workers: Mapping[K, WorkerProcess], sizes: list[int], rounds: int, min_s: float,
              each_round: Callable[[], object] | None = None,
              ) -> tuple[dict[tuple[K, int], list[float]], dict[K, list[float]]]:
    """Images/s of every worker at every batch size, `rounds` times (each_round runs first in each),
    the workers' order rotated each round so that no variant always follows the same one; after each
    call the worker is left to go idle before the next one runs (the CPU it used meanwhile is in
    the second result)."""
    rates: dict[tuple[K, int], list[float]] = {}
    after: dict[K, list[float]] = {}
    for r in range(rounds):
        if each_round is not None:
            each_round()
        keys = list(workers)
        keys = keys[r % len(keys):] + keys[: r % len(keys)]
        for b in sizes:
            for key in keys:
                answer = workers[key].ask({"batch": b, "min_s": min_s})
                rates.setdefault((key, b), []).append(answer["images_per_s"])
                after.setdefault(key, []).append(workers[key].settle())
    return rates, after


def model_only(arch: str, prep: dict[str, Any], sizes: list[int], threads: int, rounds: int,
               workdir: Path, min_s: float, variants: list[tuple[str, str]],
               ) -> tuple[list[dict[str, Any]], list[dict[str, float | None]]]:
    """Every variant in a worker process of its own (bench/backend_worker.py says why), all alive, asked
    in turn: per round the matmul peak here, then each batch size on each variant, the order rotated
    each round; after each call the worker is left to go idle before the next one runs."""
    images = workdir / f"{arch}-images.pt"
    torch.save({"images": prep["images"], "eval": prep["eval"]}, images)
    workers: dict[tuple[str, str], Worker] = {}
    try:
        for runtime, precision in variants:
            path = prep["int8"] if precision == "int8" else prep["checkpoint"]
            workers[(runtime, precision)] = Worker(
                path, runtime, "bf16" if precision == "bf16" else "fp32", images, sizes, threads,
                workdir / "cache", workdir / "logs" / f"worker-{arch}-{runtime}-{precision}.log")
        for w in workers.values():  # all loading at once (each is single-threaded for most of it)
            w.wait_ready()
            w.settle()
        top1 = {key: w.ask({"top1": True})["top1"] for key, w in workers.items()}
        peaks: list[dict[str, float | None]] = []
        rates, after = alternate(workers, sizes, rounds, min_s, lambda: peaks.append(peak_gflops(threads)))
        ready = {key: w.ready for key, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    peak = {name: _median_or_none([p[name] for p in peaks]) for name in peaks[0]}
    reference = top1[("torch", "fp32")]
    rows = []
    for runtime, precision in workers:
        labels = top1[(runtime, precision)]
        agree = sum(a == b for a, b in zip(labels, reference, strict=True)) / len(reference)
        for b in sizes:
            ips = statistics.median(rates[((runtime, precision), b)])
            base = statistics.median(rates[(("torch", "fp32"), b)])
            rows.append({"arch": arch, "runtime": runtime, "precision": precision, "batch": b,
                         "images_per_s": ips, "vs_torch_fp32": ips / base,
                         "rounds": rates[((runtime, precision), b)],
                         "peak_share": ips * prep["gflop"] / (peak[precision] or math.nan),
                         "top1_agreement": agree,
                         "cpu_after_call_s": statistics.median(after[(runtime, precision)]),
                         "worker_rss_mb": ready[(runtime, precision)]["rss_mb"]})
    return rows, peaks


def through_service(arch: str, prep: dict[str, Any], bodies: list[bytes], workdir: Path, clients: int,
                    requests: int, threads: int, max_batch: int, rounds: int,
                    variants: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One service per variant, started one after another (cold start and idle RSS read while the
    others sit idle), all kept up and loaded in turn for `rounds` rounds of `requests` each."""
    servers = {}
    with contextlib.ExitStack() as stack:
        for runtime, precision in variants:
            path = prep["int8"] if precision == "int8" else prep["checkpoint"]
            settings = {"runtime": runtime, "precision": "bf16" if precision == "bf16" else "fp32",
                        "max_batch_size": str(max_batch), "export_cache_dir": str(workdir / "cache")}
            if threads:
                settings["torch_threads"] = str(threads)
            server = service_server(path, settings, workdir / "logs", name=f"{arch}-{runtime}-{precision}")
            servers[(runtime, precision)] = stack.enter_context(server)
        reqs = {key: [build_request(HOST, s.port, "/v1/predict", b, "image/jpeg") for b in bodies]
                for key, s in servers.items()}
        for key, s in servers.items():
            load(HOST, s.port, reqs[key], clients, clients * 2)  # warm the connections
        results: dict[tuple[str, str], list[Any]] = {key: [] for key in servers}
        for rnd in range(rounds):
            keys = list(servers)
            for key in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:
                results[key].append(load(HOST, servers[key].port, reqs[key], clients, requests))
    rows: list[dict[str, Any]] = []
    for (runtime, precision), res in results.items():
        server = servers[(runtime, precision)]
        rows.append({"arch": arch, "runtime": runtime, "precision": precision, "clients": clients,
                     "rps": statistics.median(x.rps for x in res), "rounds": [x.rps for x in res],
                     "p50_ms": statistics.median(x.p50_ms for x in res),
                     "p99_ms": statistics.median(x.p99_ms for x in res),
                     "errors": sum(x.errors for x in res), "cold_start_s": server.cold_start_s,
                     "idle_rss_mb": server.idle_rss_mb})
    base = next(r["rps"] for r in rows if r["runtime"] == "torch" and r["precision"] == "fp32")
    for r in rows:
        r["vs_torch_fp32"] = r["rps"] / base
    return rows


def _median_or_none(values: list[float | None]) -> float | None:
    """None where the peak was not measured (bf16 without bf16 hardware, bench/peak.py)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _gflops(v: float | None) -> str:
    return "not measured (no bf16 hardware)" if v is None else f"{v:.0f}"


def render(result: dict[str, Any]) -> str:
    peaks = result["peak_gflops"]
    lines = [
        f"command: `{result['command']}` ({result.get('minutes', float('nan')):.1f} min)",
        f"CPU: {result['cpu']}, {result['threads']} thread(s), load average {result.get('load', '?')}; "
        "peak (the better of a 2048^3 matmul and a 3x3 convolution, median of every round): "
        f"fp32 {peaks['fp32']:.0f}, bf16 {_gflops(peaks['bf16'])}, "
        f"int8 {peaks['int8']:.0f} GFLOP/s (GOP/s) in the same run.", "",
        "Model-only (one worker process per variant, alternating rounds, medians):", "",
        *[f"Not run: {name}, {why}.\n" for name, why in result.get("skipped", {}).items()],
        "| model | runtime | precision | batch | images/s | x torch fp32 | share of peak | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cells = ("arch", "runtime", "precision", "batch")
    for r in result["model_only"]:
        lines.append("| " + " | ".join(str(r[k]) for k in cells) + f" | {r['images_per_s']:.1f} "
                     f"| {r['vs_torch_fp32']:.2f} | {100 * r['peak_share']:.0f}% "
                     f"| {100 * r['top1_agreement']:.1f}% |")
    spin = {f"{r['runtime']} {r['precision']}": r["cpu_after_call_s"] for r in result["model_only"]}
    lines += ["", "CPU a worker used after answering, before it went idle (median per call, all models): "
              + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in spin.items())]
    if result["service"]:
        up = len({(r["runtime"], r["precision"]) for r in result["service"]})
        lines += ["", f"Through the service ({result['service'][0]['clients']} clients, all {up} up, "
                  "loaded in turn, medians of the rounds):", "",
                  "| model | runtime | precision | clients | req/s | x torch fp32 | p50 ms | p99 ms "
                  "| errors | cold start s | idle RSS MiB |", "|---" * 11 + "|"]
        cells = ("arch", "runtime", "precision", "clients")
        for r in result["service"]:
            lines.append("| " + " | ".join(str(r[k]) for k in cells) + f" | {r['rps']:.1f} "
                         f"| {r['vs_torch_fp32']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                         f"| {r['errors']} | {r['cold_start_s']:.1f} | {r['idle_rss_mb']:.0f} |")
    if result.get("image_size"):
        lines += ["", "Installed size (this environment's site-packages; an extra: what it adds):",
                  "", "| backend | extra | MB | of which CUDA libraries | largest packages |",
                  "|---|---|---|---|---|"]
        for backend, info in result["image_size"].items():
            top = sorted(info["packages"].items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"| {backend} | {info['extra'] or '(base install)'} | {info['mb']:.0f} "
                         f"| {info['cuda_mb']:.0f} | " + ", ".join(f"{n} {mb:.0f}" for n, mb in top) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated models")
    p.add_argument("--threads", type=int, default=0, help="model-only threads (0: every usable core)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--min-seconds", type=float, default=0.5, help="model-only: seconds per measurement")
    p.add_argument("--requests", type=int, default=96,
                   help="per backend and round through the service (0: skip)")
    p.add_argument("--service-rounds", type=int, default=2)
    p.add_argument("--trained-checkpoint", type=Path, help="a trained convnet (default: random weights)")


def run(args: argparse.Namespace, workdir: Path, command: str) -> dict[str, Any]:
    from bench.report import machine_info
    from service.settings import usable_cores

    began = time.perf_counter()
    threads = args.threads or usable_cores()
    sets = generate(args.inputs or workdir / "inputs", args.seed, quick=False)
    sizes = sorted({1, args.max_batch_size})
    variants, skipped = runnable_variants()
    for name, why in skipped.items():
        log.info("%s not run: %s", name, why)
    result: dict[str, Any] = {"command": command, "cpu": machine_info().get("cpu", "?"), "threads": threads,
                              "model_only": [], "peak_rounds": [], "service": [], "skipped": skipped,
                              "image_size": backend_sizes()}
    loads = [os.getloadavg()[0]]
    for arch in args.archs.split(","):
        bodies = sets[ARCHS[arch]].load()
        prep = prepare(arch, workdir, bodies, args.trained_checkpoint)
        rows, peaks = model_only(arch, prep, sizes, threads, args.rounds, workdir, args.min_seconds,
                                 variants)
        result["model_only"] += rows
        result["peak_rounds"] += peaks
        loads.append(os.getloadavg()[0])
        if args.requests:
            result["service"] += through_service(arch, prep, bodies, workdir, args.clients, args.requests,
                                                 args.torch_threads, args.max_batch_size, args.service_rounds,
                                                 variants)
            loads.append(os.getloadavg()[0])
        log.info("%s done", arch)
    result["peak_gflops"] = {k: _median_or_none([p[k] for p in result["peak_rounds"]]) for k in PRECISIONS}
    result["load"] = f"{min(loads):.1f}-{max(loads):.1f}"
    result["minutes"] = (time.perf_counter() - began) / 60
    args.out.write_text(render(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    return result
