"""Temperature scaling: one number T, fitted on held-out logits, so that softmax(z / T) means what it says.

A network trained to low cross-entropy is usually over-confident on images it has not seen (Guo et al.,
"On Calibration of Modern Neural Networks", 2017). Dividing every logit by one T > 0 changes no
prediction (argmax and ranking are the same) and only rescales the confidence; the T that minimises the
validation negative log-likelihood is the standard fix. Pure tensor math here: no files, no models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

BINS = 15  # equal-width confidence bins for ECE and the reliability diagram (the usual choice)
# The search range. A validation split the model gets (almost) entirely right has no finite optimum:
# sharper always lowers its NLL, and the search runs into T_MIN. That is no evidence that the model
# should be more confident on the images it will be served, so calibrate() then keeps T = 1 (raw
# softmax) and says so; at T_MAX (a model near chance level) flattening is honest and is kept.
T_MIN, T_MAX = 0.05, 20.0
_GOLDEN = (math.sqrt(5) - 1) / 2


def sig(x: float, digits: int = 5) -> float:
    """Round to `digits` significant digits: the metadata header stays small and readable."""
    return float(f"{x:.{digits}g}")


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T), in float64."""
    return float(F.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(
    logits: torch.Tensor, targets: torch.Tensor, lo: float = T_MIN, hi: float = T_MAX, iters: int = 80
) -> float:
    """The T in [lo, hi] minimising the NLL of softmax(logits / T).

    NLL(z * b) is convex in b = 1/T (a log-sum-exp minus a linear term), so it is unimodal in log T and
    a golden-section search on log T finds the minimum: deterministic (no random start, no learning
    rate, the same answer on every run), and 80 steps narrow the interval far below float precision.
    """
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need (N, K) logits and N targets with N > 0, got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    z = logits.double()
    a, b = math.log(lo), math.log(hi)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = nll(z, targets, math.exp(c)), nll(z, targets, math.exp(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = nll(z, targets, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = nll(z, targets, math.exp(d))
    return math.exp((a + b) / 2)


def _bin_sums(probs: torch.Tensor, targets: torch.Tensor, bins: int) -> tuple[torch.Tensor, ...]:
    conf, pred = probs.double().max(dim=1)  # (N,), (N,)
    correct = (pred == targets).double()
    # bin i holds confidences in (i/bins, (i+1)/bins]; a confidence is never 0 (it is a max of K >= 1)
    idx = (conf * bins).ceil().long().clamp_(1, bins) - 1
    count = torch.bincount(idx, minlength=bins)
    return count, torch.bincount(idx, conf, minlength=bins), torch.bincount(idx, correct, minlength=bins)


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|."""
    count, conf_sum, acc_sum = _bin_sums(probs, targets, bins)
    return float((acc_sum - conf_sum).abs().sum() / max(1, int(count.sum())))


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> dict[str, list[Any]]:
    """Per bin: mean confidence, accuracy (null where the bin is empty) and image count."""
    count, conf_sum, acc_sum = _bin_sums(probs, targets, bins)
    n = count.tolist()
    return {
        "confidence": [sig(c / k) if k else None for c, k in zip(conf_sum.tolist(), n, strict=True)],
        "accuracy": [sig(a / k) if k else None for a, k in zip(acc_sum.tolist(), n, strict=True)],
        "count": n,
    }


def calibrate(logits: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> dict[str, Any]:
    """The record stored as CheckpointMeta.calibration (layout: docs/calibration.md)."""
    fitted = sig(fit_temperature(logits, targets))
    at_bound = math.isclose(fitted, T_MIN, rel_tol=1e-3) or math.isclose(fitted, T_MAX, rel_tol=1e-3)
    no_optimum = math.isclose(fitted, T_MIN, rel_tol=1e-3)
    t = 1.0 if no_optimum else fitted  # the service divides by exactly the stored number
    before, after = logits.double().softmax(dim=1), (logits.double() / t).softmax(dim=1)
    return {
        "method": "temperature",
        "temperature": t,
        "fitted_temperature": fitted,
        "at_bound": at_bound,
        "note": ("the validation split has too few mistakes to fit a temperature (the NLL falls all the "
                 f"way to T = {T_MIN}): T = 1 kept, probabilities as trained") if no_optimum else "",
        "fitted_on": "validation",
        "images": int(targets.numel()),
        "bins": bins,
        "nll_before": sig(nll(logits, targets)),
        "nll_after": sig(nll(logits, targets, t)),
        "ece_before": sig(ece(before, targets, bins)),
        "ece_after": sig(ece(after, targets, bins)),
        "reliability": {
            "before": reliability(before, targets, bins),
            "after": reliability(after, targets, bins),
        },
    }
