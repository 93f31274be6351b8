"""Load-time model optimisations for inference: batch-norm folding, trace/compile, batch buckets.

All of it runs once when a checkpoint is loaded (start-up or reload), never on the request path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)
# Largest acceptable probability difference between the folded and the original model on a probe
# batch. Folding is exact algebra; what differs is float32 rounding (measured ~1e-7 here).
FOLD_TOLERANCE = 1e-4


def fold_batchnorm(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, float | None]:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution's
    weights (torch.fx), so inference runs one op where it ran two (BN was ~20% of mobilenet's
    inference time). Returns (model, max probability difference on a probe batch); the original
    model, unchanged, when nothing folds, tracing fails or the check fails.

    Runs on the float32 CPU model, before any dtype/device change, so reduced precision starts from
    exactly folded weights."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, None
    from torch.fx.experimental.optimization import fuse  # lazy: pulls in torch.fx

    try:
        fused = fuse(model, inplace=False).eval()
    except Exception as e:  # not symbolically traceable (data-dependent control flow): keep it as is
        log.info("batch-norm folding skipped: torch.fx cannot trace the model (%s)", e)
        return model, None
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if left == before:  # e.g. conv -> relu -> bn: nothing to fold, keep the original module tree
        return model, None
    # one image: batch norm in eval mode is per image, so a second one checks nothing more
    probe = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(probe).float().softmax(dim=-1)
        got = fused(probe).float().softmax(dim=-1)
    diff = float((want - got).abs().max())
    if not diff <= FOLD_TOLERANCE:  # also catches NaN
        log.warning("batch-norm folding disabled: probabilities differ by %.2g on a probe batch", diff)
        return model, diff
    log.info("folded %d of %d batch-norm layers into convolutions (max prob. diff %.1g)",
             before - left, before, diff)
    return fused, diff


def optimise(model: nn.Module, mode: str, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`off`: the eager model; `trace`: TorchScript trace + freeze + optimize_for_inference;
    `compile`: torch.compile with one static graph per batch bucket (built during warm-up)."""
    if mode == "compile":
        return torch.compile(model, dynamic=False)
    if mode == "trace":
        # Frozen TorchScript picks oneDNN layouts on the CPU. torch.jit is deprecated in favour of
        # torch.compile but needs no compiler at start-up; its FutureWarnings are expected here.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, example)
            optimised: Callable[[torch.Tensor], torch.Tensor] = torch.jit.optimize_for_inference(
                torch.jit.freeze(traced)
            )
        return optimised
    return model


def allow_graphs(count: int) -> None:
    """torch.compile keeps at most `recompile_limit` (8) graphs per function and silently runs
    eager after that: raise it to cover every bucket."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < count:
        dynamo_config.recompile_limit = count


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding n images (buckets sorted ascending), or the largest one."""
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]
