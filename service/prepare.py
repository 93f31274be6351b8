"""`python -m service prepare [flags]`: do ahead of serving what a first start works out once per
checkpoint and machine, then exit: export the checkpoint for ONNX Runtime, time it against torch as
warm-up would, and keep the `--runtime auto` decision beside the checkpoint (or in
--export-cache-dir) for the server to read.

Why: a first start under auto serves torch at once and times onnxruntime after ready
(service/runtime_trial.py). That costs the serving process the exporter's code and state for
its whole life (+14 MiB of anonymous memory and +5 MiB of libtorch code on the default convnet:
1.13x the baseline's idle RSS where later starts are at 1.09x, docs/benchmarks.md), and a trial
that meets traffic is not kept, so a busy fleet pays it again at every new pod. Run here, on an
idle node before the server starts (a Kubernetes init container, a `docker compose run`), the
timing meets no traffic and the server starts as a later start: it reads the decision, builds only
the winner, and never imports the exporter.

It takes the server's own flags and CONVSERVE_* variables (those that serving alone reads, such as
the port, are ignored): the decision is keyed by the settings that change either side's time, so
it must run with the same ones as the server it prepares for. Exit 0 when the server will find the
answer (kept now or before, or nothing to decide: `--runtime torch`, a GPU, an .onnx file); 1 when
a measured decision could not be written anywhere; 2 for bad flags or an unreadable checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from model.checkpoint import CheckpointError
from model.device import resolve_device
from service import runtime_choice
from service.logs import configure_logging
from service.predictor import Predictor
from service.settings import Settings
from service.state import build_predictor, warm_up

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What a server started with the same settings will do, and where the decision lies."""

    runtime: str
    reason: str
    measured: bool  # timed now (False: recalled, or nothing to time)
    kept_in: str | None  # the decision file the server will read; None: nothing kept
    took_s: float

    @property
    def ok(self) -> bool:
        return self.kept_in is not None or not self.measured

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "reason": self.reason, "measured": self.measured,
                "kept_in": self.kept_in, "took_s": round(self.took_s, 2)}


def prepare(settings: Settings) -> Prepared:
    """Build the predictor as a reload would (the candidate exported and built at once), then warm
    it up and choose as start-up does, on this thread; the decision is kept when one was timed."""
    start = time.perf_counter()
    torch.set_num_threads(settings.batch_threads)  # as the server's lifespan does before warm-up
    device = resolve_device(settings.device)
    predictor = build_predictor(settings, device, settings.checkpoint)
    measured = predictor.runtime_candidate is not None
    if measured:
        warm_up(predictor, settings.warmup_sizes(), settings.lone_threads, auto=settings.warmup == "auto")
    choice = predictor.runtime_choice
    return Prepared(choice.runtime, choice.reason, measured, _kept_in(predictor, settings),
                    time.perf_counter() - start)


def _kept_in(predictor: Predictor, settings: Settings) -> str | None:
    """The file a later start with these settings recalls the decision from (read back, not assumed)."""
    key = predictor.choice_key
    if key is None:
        return None
    found = runtime_choice.recall(predictor.path, predictor.sha256, settings.export_cache_dir, key)
    return str(found[1]) if found else None


def main(settings: Settings) -> int:
    configure_logging(settings.log_format, settings.log_level, access_log=False)
    try:
        prepared = prepare(settings)
    except (CheckpointError, ValueError) as e:
        print(f"convserve-serve prepare: {e}", file=sys.stderr)
        return 2
    print(json.dumps(prepared.describe()), flush=True)
    if not prepared.ok:
        print("convserve-serve prepare: the decision was measured but could not be kept: make the "
              "checkpoint's folder or --export-cache-dir writable", file=sys.stderr)
        return 1
    return 0
