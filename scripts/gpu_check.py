"""The Python half of scripts/gpu-check.sh: each step logs to OUTDIR and adds rows to summary.md.

    python scripts/gpu_check.py OUTDIR      (exits 3 at once when torch sees no CUDA device)

Every step has its own timeout inside the script's 8 minutes; a failing step is recorded and the
next one runs, so one run shows everything that fails. Never yet run on a real GPU (docs/gpu.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NO_GPU = 3


@dataclass
class Report:
    out: Path
    steps: list[tuple[str, bool, float, str]] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)

    def step(self, name: str, fn: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail, ok = fn(), True
        except Exception as e:  # recorded; the next step still runs
            detail, ok = f"{type(e).__name__}: {e}"[:300], False
        self.steps.append((name, ok, time.monotonic() - start, detail))
        print(f"[gpu-check] {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def render(self) -> str:
        lines = ["| Step | Result | Seconds | Detail |", "|---|---|---|---|"]
        lines += [f"| {n} | {'pass' if ok else '**FAIL**'} | {s:.1f} | {d.replace('|', '/')} |"
                  for n, ok, s, d in self.steps]
        lines += ["", "| Measure | Value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.numbers.items()]
        return "\n".join(lines) + "\n"

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _, _ in self.steps)


def cuda_or_exit() -> str:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        raise SystemExit(NO_GPU)
    return torch.cuda.get_device_name(0)


def sh(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command, its output into `log`; raise naming the log when it fails."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=full, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}, see {log.name}: {tail[0][:200]}")
    return tail[0][:200]


def precision_vs_cpu(out: Path) -> str:
    import torch

    from service.predictor import Predictor
    from tests.conftest import make_checkpoint

    ckpt = make_checkpoint(out / "tiny.safetensors")
    cpu = Predictor.load(ckpt, torch.device("cpu"), max_batch_size=8)
    g = torch.Generator().manual_seed(0)
    x = [torch.randint(0, 256, cpu.input_shape, dtype=torch.uint8, generator=g) for _ in range(8)]
    want = cpu.forward(x)
    diffs = []
    for precision in ("fp32", "fp16", "bf16"):
        gpu = Predictor.load(ckpt, torch.device("cuda", 0), precision=precision, max_batch_size=8)
        got = gpu.forward(x)
        diff = (got - want).abs().max().item()
        limit = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}[precision]
        diffs.append(f"{precision} max|dp| {diff:.1e}")
        if diff > limit:
            raise AssertionError(f"{precision} differs from the CPU by {diff:.3g} (limit {limit})")
    return ", ".join(diffs)


def train_resume_load(out: Path) -> str:
    import torch

    from service.predictor import Predictor

    run = out / "train"
    base = [sys.executable, "-m", "training", "train", "--device", "cuda", "--amp", "--channels-last",
            "--out", str(run), "--no-progress"]
    sh([*base, "--epochs", "2"], out / "train.log", 150)
    log = sh([*base, "--epochs", "3", "--resume", str(run / "train_state.pt")], out / "resume.log", 90)
    cpu = Predictor.load(run / "model.safetensors", torch.device("cpu"))
    return f"resumed to epoch 3 ({log[:80]}); model.safetensors loads on the CPU ({cpu.meta.arch})"


def serve_and_load(out: Path, report: Report) -> str:
    import httpx

    from tests import images
    from tests.conftest import free_port

    ckpt = out / "train" / "model.safetensors"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CONVSERVE_ADMIN_API_KEY": "gpu-check",
           "CONVSERVE_MAX_BATCH_SIZE": "64", "CONVSERVE_QUEUE_LIMIT": "1024"}
    log = out / "serve.log"
    start = time.monotonic()
    with log.open("w") as f:
        argv = [sys.executable, "-m", "service", "--checkpoint", str(ckpt), "--device", "auto",
                "--port", str(port)]
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}; see serve.log")
            try:
                if c.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > 120:
                raise RuntimeError("not ready in 120 s; see serve.log")
            time.sleep(0.1)
        report.numbers["cold start to ready (s)"] = f"{time.monotonic() - start:.1f}"
        info = c.get("/v1/model").json()
        if info["device"] != "cuda:0" or "device auto -> cuda:0" not in log.read_text():
            raise AssertionError(f"--device auto chose {info['device']}, not cuda:0")
        jpeg = images.jpeg()
        assert c.post("/v1/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
        files = [("file", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(8)]
        multi = c.post("/v1/predict", files=files)
        assert multi.status_code == 200 and len(multi.json()["results"]) == 8, multi.text[:200]
        codes: list[int] = []
        lat: list[float] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as cc:
                while not stop.is_set():
                    t = time.perf_counter()
                    codes.append(cc.post("/v1/predict", content=jpeg,
                                         headers={"Content-Type": "image/jpeg"}).status_code)
                    lat.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(3)
        reload = c.post("/v1/model/reload", headers={"X-API-Key": "gpu-check"})  # under traffic
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        if reload.status_code != 200:
            raise AssertionError(f"reload under traffic answered {reload.status_code}: {reload.text[:200]}")
        bad = [x for x in codes if x != 200]
        if bad:
            raise AssertionError(f"{len(bad)}/{len(codes)} requests failed (16 clients, reload): {bad[:3]}")
        lat.sort()
        report.numbers["16 clients, live service (req/s, p50/p99 ms)"] = (
            f"{len(codes) / 6:.0f}, {1e3 * lat[len(lat) // 2]:.1f}/{1e3 * lat[int(len(lat) * 0.99)]:.1f}")
        metrics = c.get("/metrics").text
        for name in ("allocated", "reserved", "used", "total"):
            m = re.search(rf'convserve_gpu_memory_{name}_bytes{{device="cuda:0"}} (\S+)', metrics)
            if m is None:
                raise AssertionError(f"/metrics has no convserve_gpu_memory_{name}_bytes for cuda:0")
            report.numbers[f"GPU memory {name} (MiB)"] = f"{float(m.group(1)) / 2**20:.0f}"
        return f"auto -> cuda:0; {len(codes)} requests at 16 clients, reload {reload.json()['reload_ms']} ms"
    finally:
        proc.terminate()
        proc.wait(30)


def throughput(out: Path, report: Report) -> str:
    """In-process images/s for resnet18 (random weights) at batch 16/32/64, fp32 and fp16."""
    import torch

    from bench.run import make_checkpoint
    from service.predictor import Predictor

    ckpt = make_checkpoint("resnet18", 1000, out / "resnet18.safetensors")
    for precision in ("fp32", "fp16"):
        p = Predictor.load(ckpt, torch.device("cuda", 0), precision=precision, max_batch_size=64)
        for n in (16, 32, 64):
            x = [torch.zeros(p.input_shape, dtype=torch.uint8)] * n
            p.forward(x)  # warm (cuDNN algorithm choice)
            start = time.perf_counter()
            for _ in range(10):
                p.forward(x)
            report.numbers[f"resnet18 in-process {precision} batch {n} (images/s)"] = \
                f"{10 * n / (time.perf_counter() - start):.0f}"
    return "see the measures table"


def bench_rows(doc: Any) -> list[dict[str, Any]]:
    """Every summary row ({server, concurrency, rps, p50_ms, p99_ms, ...}) anywhere in bench JSON."""
    if isinstance(doc, dict):
        if {"server", "concurrency", "rps"} <= doc.keys():
            return [doc]
        return [r for v in doc.values() for r in bench_rows(v)]
    if isinstance(doc, list):
        return [r for v in doc for r in bench_rows(v)]
    return []


def bench(out: Path, report: Report) -> str:
    md = out / "bench-resnet18.md"
    sh([sys.executable, "-m", "bench", "run", "--only", "resnet18-640", "--rounds", "1", "--scale", "0.5",
        "--no-variants",
        "--device", "cuda:0", "--out", str(md)], out / "bench.log", 200)
    for row in bench_rows(json.loads(md.with_suffix(".json").read_text())):
        if row["server"] == "service" and row["concurrency"] in (16, 64):
            report.numbers[f"bench resnet18 service, {row['concurrency']} clients (req/s, p50/p99 ms)"] = (
                f"{row['rps']:.0f}, {row['p50_ms']:.1f}/{row['p99_ms']:.1f}")
    return f"wrote {md.name}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/gpu_check.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    gpu = cuda_or_exit()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    report.numbers["GPU"] = gpu
    py = sys.executable
    report.step("CUDA tests", lambda: sh([py, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda"],
                                         out / "pytest-cuda.log", 120))
    report.step("service tests, no device pinned", lambda: sh(
        [py, "-m", "pytest", "-q", "-x", "tests/service"], out / "pytest-service.log", 150,
        {"CONVSERVE_TEST_DEVICE": "auto"}))
    report.step("fp32/fp16/bf16 on cuda:0 vs the CPU", lambda: precision_vs_cpu(out))
    report.step("train (AMP, channels_last), resume, load on the CPU", lambda: train_resume_load(out))
    report.step("serve --device auto: traffic, metrics, reload", lambda: serve_and_load(out, report))
    report.step("in-process throughput", lambda: throughput(out, report))
    report.step("bench resnet18 (every server on cuda:0)", lambda: bench(out, report))
    text = f"# gpu-check on {gpu}\n\n" + report.render()
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
