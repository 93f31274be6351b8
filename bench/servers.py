"""Servers under test as subprocesses on 127.0.0.1: start, wait for ready, read RSS/CPU, stop.

RSS and CPU time come from /proc/PID (Linux): the server's own numbers, not the client's.
"""

from __future__ import annotations

import compileall
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def compile_bytecode(tree: Path = REPO) -> None:
    """Write the .pyc files of a source tree's packages before any server starts from it.

    An installed wheel (the container image) has them; an editable checkout run with
    PYTHONDONTWRITEBYTECODE=1 recompiles every project module at every start (about 0.3 s for the
    service's, far less for the baseline's few), which is not the cold start an operator sees."""
    for package in ("model", "service", "bench", "training"):
        if (tree / package).is_dir():
            compileall.compile_dir(str(tree / package), quiet=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (VmRSS), or NaN when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot, from /proc/stat."""
    try:
        parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    values = [int(v) for v in parts]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK_TCK


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the benchmark process dies, so no server outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One server process. `cold_start_s` is the time from spawning the process to /readyz 200."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log_dir: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.log_path = log_dir / f"{name}-{port}.log"
        self.cwd = REPO  # the source tree `python -m` runs from (another checkout to compare with)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cold_start_s = float("nan")
        self.idle_rss_mb = float("nan")
        self.settled_s = float("nan")  # spawn -> the runtime choice settled (ready, or after its trial)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}

    def start(self, timeout: float = 600.0) -> Server:
        env = self.full_env()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            start = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = start + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_get(self.port, "/readyz", timeout=2.0)[0] == 200:
                    self.cold_start_s = time.perf_counter() - start
                    self._wait_settled(deadline)
                    self.settled_s = time.perf_counter() - start
                    time.sleep(0.5)  # let start-up garbage settle before the idle reading
                    self.idle_rss_mb = rss_mb(self.pid)
                    log.info("%s ready in %.1fs (runtime settled at %.1fs), idle RSS %.0f MiB", self.name,
                             self.cold_start_s, self.settled_s, self.idle_rss_mb)
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s; log:\n{self.log_tail()}")

    def _wait_settled(self, deadline: float) -> None:
        """Until a first start's runtime trial is over (/v1/model runtime_choice.pending; the service
        is ready on torch before it, service/runtime_trial.py): what is measured from here on, the
        idle RSS included, is the runtime it settled on. A server without the field is settled."""
        while time.perf_counter() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError, AttributeError):
                status, body = http_get(self.port, "/v1/model", timeout=5.0)
                if status != 200 or not json.loads(body).get("runtime_choice", {}).get("pending"):
                    return
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit %.0fs after SIGTERM; killing it", self.name, grace)
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def service_server(
    checkpoint: Path, settings: dict[str, str], log_dir: Path, name: str = "service"
) -> Server:
    """`python -m service` with CONVSERVE_* settings (the way an operator starts it)."""
    port = free_port()
    env = {f"CONVSERVE_{k.upper()}": str(v) for k, v in settings.items()}
    argv = [sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
            "--port", str(port)]
    return Server(name, argv, env, port, log_dir)


def baseline_server(checkpoint: Path, torch_threads: int, log_dir: Path, device: str = "cpu") -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.baseline", "--checkpoint", str(checkpoint), "--port", str(port),
            "--torch-threads", str(torch_threads), "--device", device]
    return Server("baseline", argv, {}, port, log_dir)
