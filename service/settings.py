"""Every setting of the service, from CLI flags or `CONVSERVE_*` environment variables.

Built once in `create_app` (never at import), so tests and the CLI can pass their own. A bad value
stops start-up with a message that names the setting and its environment variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CONVSERVE_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class SettingsError(ValueError):
    """A setting is invalid; the message names it (flag and environment variable) and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    checkpoint: Path = Field(
        description="the .safetensors checkpoint to serve, or a convserve .onnx file (e.g. an int8 one "
        "from `python -m training quantize`) for --runtime onnxruntime/openvino"
    )
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="inference backend: torch (eager/trace/compile), onnxruntime or openvino (CPU; the "
        "checkpoint is exported to ONNX at load, cached beside it, and checked against torch); auto: "
        "onnxruntime where it is installed and warm-up measured it faster than torch, else torch "
        "(service/runtime_choice.py; GET /v1/model runtime_choice says which and why)",
    )
    export_cache_dir: Path | None = Field(
        None,
        description="where ONNX exports are cached when the checkpoint's folder is read-only "
        "(default: a folder in the system temp dir)",
    )
    precision: Literal["fp32", "fp16", "bf16", "auto"] = Field(
        "fp32",
        description="inference dtype; auto: bf16 (fp16 on pre-Ampere GPUs) where the hardware has it, "
        "it measured faster at warm-up and it agreed with fp32 on top-1 over 16 probe images, else "
        "fp32 (service/precision.py; GET /v1/model precision_choice says which and why)",
    )
    tf32: bool = Field(
        False,
        description="on CUDA, let fp32 convolutions and matmuls use TF32 tensor cores (Ampere and "
        "later: faster, ~3 fewer decimal digits); off by default so that fp32 means fp32",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels_last memory format; auto turns it on where it is faster"
    )
    compile: Literal["off", "trace", "compile"] = Field(
        "off",
        description="off (eager), trace (jit trace + freeze + optimize_for_inference: folds batch-norm) "
        "or compile (torch.compile, one graph per warmed-up batch size)",
    )
    fold_batchnorm: bool = Field(
        True,
        description="fold batch-norm into the preceding convolutions at load (checked against the "
        "unfolded model on a probe batch; --no-fold-batchnorm keeps the model as trained)",
    )
    calibration: bool = Field(
        True,
        description="apply the checkpoint's fitted temperature to the logits before the softmax "
        "(docs/calibration.md); --no-calibration serves the raw softmax",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="largest batch the model runs")
    max_batch_wait_ms: float = Field(
        2.0, ge=0, le=10_000, description="how long a batch already forming may wait to fill up"
    )
    queue_limit: int = Field(256, ge=1, description="images decoding or waiting for the model; beyond it 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="request body limit (413)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width*height limit (413)")
    max_images_per_request: int = Field(64, ge=1, description="images in one multipart/JSON request")
    default_top_k: int = Field(5, ge=1, le=1000, description="predictions returned when top_k is absent")
    decode_threads: int = Field(0, ge=0, description="image decode threads; 0 = one per CPU core")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads; 0 = auto: warm-up times the model on cores-1 (leaving a "
        "core to decoding) and on every core; a lone request takes every core whenever that measured "
        "faster (below 0.97x: timing noise), batches only below 0.75x, since they run while the decode "
        "threads are busy (service/threads.py); real batches re-check the choice now and then "
        "(service/thread_tuner.py; GET /v1/model shows the counts in use)",
    )
    warmup: Literal["auto", "all", "pow2", "max"] = Field(
        "auto",
        description="batch sizes warmed up before ready: every size, powers of two, or max only; auto = "
        "pow2, except for the eager torch model on the CPU, which warms only the sizes the thread timing "
        "runs (1 and one batch: a size's first batch there costs ~15 ms more than later ones, warming "
        "it costs the whole batch)",
    )
    ui: bool = Field(True, description="serve the web page at / (--no-ui for API-only deployments)")
    explain_concurrency: int = Field(
        1, ge=1, le=64, description="explanations (/v1/explain, /v1/features) computed at once"
    )
    explain_queue_limit: int = Field(
        8, ge=1, description="explanations running or waiting; beyond it 503 (predictions are not affected)"
    )
    explain_timeout_s: float = Field(30.0, gt=0, description="an explanation waiting longer gets 504")
    explain_threads: int = Field(
        1, ge=1, description="torch threads per explanation (few: leave the cores to predictions)"
    )
    explain_yield_ms: float = Field(
        20.0, ge=0, le=10_000,
        description="an explanation waits up to this long for a moment with no prediction in flight "
        "before it starts, so predictions go first (0: start at once); explanations' latency grows by "
        "at most this much, and under a steady stream of predictions they get at most "
        "explain_time / (explain_time + yield) of a core (docs/ui.md)",
    )
    admin_api_key: SecretStr | None = Field(
        None, description="X-API-Key for /v1/model/reload; unset disables it"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated allowed CORS origins (* for any)"
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(False, description="uvicorn access log (one line per request)")
    drain_delay_s: float = Field(
        0.0, ge=0, description="after SIGTERM, keep serving with /readyz 503 this long before closing"
    )
    grace_period_s: float = Field(30.0, gt=0, description="after SIGTERM, longest wait for in-flight work")
    # HTTP-layer limits (service/http_server.py), checked by the protocol before the app sees a byte.
    # 16 KiB of headers is 2x nginx's default large_client_header_buffers line and far above any
    # real client of this API (a browser with cookies sends ~1-4 KiB); 100 headers is h11's and
    # Go's order of magnitude; 8 KiB request line is nginx's and Apache's default.
    max_request_line_bytes: int = Field(
        8 * 1024, ge=64, description="longest request target (method line URL) in bytes (414)"
    )
    max_header_bytes: int = Field(16 * 1024, ge=256, description="total request header bytes (431)")
    max_header_count: int = Field(100, ge=8, description="most request headers (431)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must finish sending a request's headers within this (408)"
    )
    watch_checkpoint: bool = Field(
        False,
        description="reload by itself, through the validated reload path, when the checkpoint file is "
        "replaced (polled with stat; a bad new file is refused and logged, the old model keeps serving)",
    )
    watch_interval_s: float = Field(2.0, gt=0, description="how often --watch-checkpoint checks the file")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_is_file(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"no checkpoint file at {v} (export one: python -m training export ...)")
        return v

    @field_validator("max_images_per_request")
    @classmethod
    def _fits_the_queue(cls, v: int, info: ValidationInfo) -> int:
        # A request is queued all or nothing: one larger than the queue would get 503 with
        # Retry-After forever, so refuse the combination at start-up instead.
        limit = info.data.get("queue_limit")
        if isinstance(limit, int) and v > limit:
            raise ValueError(f"must be <= queue_limit ({limit}): a larger request could never be queued")
        return v

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        v = v.strip().lower()
        if not _DEVICE_RE.match(v):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or usable_cores()

    @property
    def batch_threads(self) -> int:
        """Intra-op threads for a batch, before warm-up timing: auto keeps one core for the decode
        threads; warm-up (service.state.warm_up) switches to every core when that is clearly faster."""
        return self.torch_threads or max(1, usable_cores() - 1)

    @property
    def lone_threads(self) -> int:
        """The all-cores candidate warm-up times against `batch_threads` (for batches and lone images)."""
        return self.torch_threads or usable_cores()

    def warmup_sizes(self) -> list[int]:
        """Batch sizes run once before ready, so the first real batch of each size is not slow."""
        top = self.max_batch_size
        if self.warmup == "max":
            return [top]
        if self.warmup in ("pow2", "auto"):
            sizes = [1 << i for i in range(top.bit_length()) if (1 << i) < top]
            return [*sizes, top]
        return list(range(1, top + 1))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def load_settings(**overrides: object) -> Settings:
    """Build Settings (env + overrides) or raise SettingsError naming every bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        lines = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"setting {name} ({flag_name(name)} / {ENV_PREFIX}{name.upper()}): {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
