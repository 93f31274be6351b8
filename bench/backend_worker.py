"""One backend's model-only measurement in a process of its own (`bench backends` starts one per variant).

Why a process each: with all six variants in the benchmark's own process, torch fp32 measured 17-50
images/s model-only on the default convnet at batch 1 while the service served it at 377 req/s. Two
things did it (docs/runtimes.md, "Model-only: one backend per process"): libgomp read its environment
when `bench` imported torch, before OMP_WAIT_POLICY=PASSIVE was set, so torch's OpenMP threads
spin-waited on a loaded 2-core machine (and the service, which sets it before importing torch, did
not); and ONNX Runtime's and OpenVINO's own thread pools, alive in the same process, kept competing
with torch's. Here every process gets the service's wait policy at start and holds one runtime's pools.

    python -m bench.backend_worker --checkpoint F --runtime R --precision P --images T.pt --sizes 1,16
        --threads N [--export-cache-dir D]

Protocol, one JSON object per line: after loading and warming up it writes {"ready": ...}; then each
line read on stdin is a request, answered by one line on stdout:
  {"batch": B, "min_s": S}  ->  {"images_per_s": x, "calls": n}  (forward B images until S seconds)
  {"top1": true}            ->  {"top1": [class index per evaluation image]}
End of stdin ends the process. Logs go to stderr; the protocol has stdout to itself.
"""

from __future__ import annotations

import os

# Before torch is imported (libgomp reads its environment once, when it is loaded): like the service.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import torch

from bench.servers import rss_mb

# What libgomp saw when torch loaded it above (importing service sets the variable too, but later).
OMP_AT_TORCH_IMPORT = os.environ.get("OMP_WAIT_POLICY", "")


def measure(predictor: Any, images: list[torch.Tensor], batch: int, min_s: float) -> dict[str, Any]:
    """Forward passes of `batch` images (the benchmark images, repeated) until at least min_s seconds
    and two calls: a fixed time rather than a fixed count, so fast and slow models get equally long."""
    chunk = (images * (batch // len(images) + 1))[:batch]
    calls = 0
    start = time.perf_counter()
    while True:
        predictor.forward(chunk)
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 2 and elapsed >= min_s:
            return {"images_per_s": calls * batch / elapsed, "calls": calls}


def top1(predictor: Any, images: list[torch.Tensor], batch: int) -> list[int]:
    out = [predictor.forward(images[i : i + batch]).argmax(dim=1) for i in range(0, len(images), batch)]
    return [int(i) for i in torch.cat(out).tolist()]


def serve(args: argparse.Namespace, out: IO[str]) -> None:
    from service.predictor import Predictor

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    data = torch.load(args.images)
    images, evaluation = list(data["images"]), list(data["eval"])
    start = time.perf_counter()
    predictor = Predictor.load(args.checkpoint, torch.device("cpu"), runtime=args.runtime,
                               precision=args.precision, export_cache_dir=args.export_cache_dir)
    predictor.warmup(sizes)
    ready = {"ready": True, "load_s": time.perf_counter() - start, "rss_mb": rss_mb(os.getpid()),
             "torch_threads": torch.get_num_threads(), "precision": predictor.precision,
             "omp_wait_policy": OMP_AT_TORCH_IMPORT}
    print(json.dumps(ready), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("top1"):
            answer: dict[str, Any] = {"top1": top1(predictor, evaluation, max(sizes))}
        else:
            answer = measure(predictor, images, int(req["batch"]), float(req["min_s"]))
            answer["torch_threads"] = torch.get_num_threads()  # still what was set: nothing changed it
        print(json.dumps(answer), file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend_worker")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--runtime", required=True)
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (an int8 file says int8 itself)")
    p.add_argument("--images", type=Path, required=True, help="torch.save'd {'images': [...], 'eval': [...]}")
    p.add_argument("--sizes", default="1,16")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--export-cache-dir", type=Path)
    args = p.parse_args(argv)
    # The protocol keeps the real stdout; anything a library prints goes to stderr with the logs.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())


class WorkerProcess:
    """The benchmark's side of one worker process speaking this protocol (argv: the module and its
    arguments after `python -m`). Starting it returns at once; `wait_ready` waits for the load and
    warm-up."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        import subprocess

        from bench.servers import REPO, _die_with_parent

        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, preexec_fn=_die_with_parent)
        self.ready: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        """The worker's first line (it has loaded and warmed up). Separate from starting it, so that a
        benchmark can start every worker at once: their start-up is not what is measured."""
        if not self.ready:
            self.ready = self._read()
        return self.ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"backend worker exited ({self.proc.wait()}); log {self.log_path}:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def settle(self, poll_s: float = 0.05, limit_s: float = 2.0) -> float:
        """Wait until this process stops using CPU (a runtime's threads may spin on after a call, and
        would take the cores from the next variant); returns the CPU seconds it used meanwhile."""
        from bench.servers import cpu_seconds

        first = last = cpu_seconds(self.proc.pid)
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            time.sleep(poll_s)
            now = cpu_seconds(self.proc.pid)
            if now - last <= 0.011:  # at most one clock tick in a poll: idle
                break
            last = now
        return cpu_seconds(self.proc.pid) - first

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


class Worker(WorkerProcess):
    """One `bench backends` variant: the service's Predictor on a checkpoint or ONNX file."""

    def __init__(self, checkpoint: Path, runtime: str, precision: str, images: Path, sizes: list[int],
                 threads: int, cache_dir: Path, log_path: Path) -> None:
        argv = ["bench.backend_worker", "--checkpoint", str(checkpoint), "--runtime", runtime,
                "--precision", precision, "--images", str(images), "--sizes", ",".join(map(str, sizes)),
                "--threads", str(threads), "--export-cache-dir", str(cache_dir)]
        super().__init__(argv, log_path)
