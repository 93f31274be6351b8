"""`bench quantizers` parts that need no quantizer and no timing: the batch padding every variant runs
through, which variants a missing tool skips, and the report."""

from __future__ import annotations

import pytest
import torch

from bench import quantizers
from model.preprocess import Preprocess


class Recorder:
    """A variant's run: logits that identify each input row (its first pixel), and every batch size seen."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return x[:, :, 0, 0].clone()


def test_model_only_ever_runs_the_warmed_up_sizes_and_keeps_rows_in_order() -> None:
    run = Recorder()
    model = quantizers.Model(Preprocess(size=4, channels=3), run, [1, 16])
    x = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 3, 4, 4)
    out = model.logits(x)
    assert run.seen == [16, 16, 16]  # 16 + 16 + 8 padded to 16: a compiled graph never sees 8
    assert out.shape == (40, 3) and torch.equal(out[:, 0], torch.arange(40, dtype=torch.float32))
    run.seen.clear()
    assert model.logits(x[:1]).shape == (1, 3) and run.seen == [1]
    assert torch.equal(model.logits(x[3:8])[:, 0], torch.arange(3.0, 8.0)) and run.seen == [1, 16]


def test_a_variant_whose_tool_is_missing_is_skipped_with_the_extra_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quantizers.NEEDS, "nncf-ov", "no_such_module_here")
    monkeypatch.setitem(quantizers.EXTRAS, "no_such_module_here", "quantize-nncf")
    keep, skipped = quantizers.available(["fp32-torch", "nncf-ov", "qdq-ort"])
    assert keep == ["fp32-torch", "qdq-ort"]
    assert "quantize-nncf" in skipped["nncf-ov"]


def _row(variant: str, ips: tuple[float, float], **extra: object) -> dict[str, object]:
    tool, runtime, precision = quantizers.VARIANTS[variant]
    return {"arch": "convnet", "variant": variant, "tool": tool, "runtime": runtime, "precision": precision,
            "images_per_s": {1: ips[0], 16: ips[1]},
            "vs_fp32_torch": {1: ips[0] / 100, 16: ips[1] / 400}, **extra}


def test_report_has_one_row_per_variant_with_ratios_accuracy_and_failures() -> None:
    result = {
        "command": "python -m bench.quantizers --out x.md", "minutes": 2.0, "sizes": [1, 16], "threads": 2,
        "cpu": "AMD EPYC (cpu family 26)", "load": "0.5-1.0", "skipped": {"pt2e-eager": "torchao missing"},
        "versions": {"torch": "2.14.1"}, "sizes_mb": {"quantize-nncf": 12.3},
        "models": [{"arch": "convnet", "calibration": "512 images of shapes", "eval_images": 32,
                    "val_images": 1400, "rows": [
                        _row("fp32-torch", (100, 400), agreement=1.0, val_top1=1.0),
                        _row("nncf-ov", (250, 1200), agreement=0.96875, val_top1=0.995, quantize_s=3.25,
                             warmup_s=0.4, file_mb=0.1),
                        {"arch": "convnet", "variant": "qdq-ov", "tool": "t", "runtime": "openvino",
                         "error": "backend worker exited (1)"},
                    ]}],
    }
    text = quantizers.render(result)
    lines = [ln for ln in text.splitlines() if ln.startswith("| convnet")]
    assert len(lines) == 3
    assert "| 250.0 (2.50) | 1200.0 (3.00) | 96.9% | 99.5% | 3.2 | 0.4 | 0.10 |" in lines[1]
    assert "failed: backend worker exited (1)" in lines[2]
    assert "pt2e-eager skipped: torchao missing" in text and "quantize-nncf 12 MB" in text
    assert "load average 0.5-1.0" in text and "validation top-1 on 1400 images" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("| model"))
    assert header.count("|") == lines[1].count("|") == lines[2].count("|")
