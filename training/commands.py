"""The non-training subcommands: evaluate a checkpoint, export one without training, describe a network."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model.architectures import SPEC_PRESETS, SpecCNN
from model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from model.device import resolve_device
from model.registry import build_model, get_arch, list_models, load_init_weights
from training import reports
from training.build import build_network
from training.config import ConfigError, TrainConfig
from training.data import DataSpec, Sample, load_data, split_changed
from training.engine import evaluate
from training.netspec import format_network

log = logging.getLogger(__name__)


class _Remap(Dataset[Sample]):
    """Data-set class indices -> the checkpoint's, so a folder's classes may be any subset."""

    def __init__(self, base: Dataset[Sample], mapping: list[int]):
        self.base, self.mapping = base, mapping

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Sample:
        x, y = self.base[i]
        return x, self.mapping[y]


def run_evaluate(
    checkpoint: Path,
    data: str | None,
    out: Path | None,
    batch_size: int,
    device: str,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    loaded = load_checkpoint(checkpoint)
    meta, pre = loaded.meta, loaded.preprocess
    recorded = meta.training.get("data")
    data = data or recorded
    if not data:
        raise ConfigError(f"{checkpoint} does not record its data set; pass --data")
    # Rebuild the recorded validation split unless told otherwise (same seed, sizes, fraction).
    args = {**(meta.training.get("data_args") or {}), **overrides} if data == recorded else overrides
    cfg = TrainConfig(data=data, **args).validate()
    spec = DataSpec.parse(data)
    bundle = load_data(spec, pre, None, cfg, train=False)
    # The split is redrawn from seed and fraction, which reshuffles whenever any class gained or lost a
    # file: compare it with the digest recorded at training time (absent from older checkpoints).
    recorded_digest = meta.training.get("val_digest")
    split_warning = None
    if data == recorded and recorded_digest is not None and bundle.val_digest != recorded_digest:
        split_warning = split_changed(meta.training.get("data_args") or {}, cfg)
        log.warning("warning: %s", split_warning)
    missing = [label for label in bundle.labels if label not in meta.labels]
    if missing:
        raise ConfigError(f"data classes {missing} are not among the checkpoint's labels {meta.labels}")
    val: Dataset[Sample] = bundle.val
    if bundle.labels != meta.labels:
        val = _Remap(val, [meta.labels.index(label) for label in bundle.labels])
    dev = resolve_device(device)
    loader = DataLoader(val, batch_size, num_workers=0 if bundle.in_memory else 2)
    result = evaluate(loaded.model.to(dev), loader, dev, meta.num_classes, progress="evaluate")
    extra = {
        "checkpoint": str(checkpoint),
        "arch": meta.arch,
        "data": str(spec),
        "split": "validation",
        "skipped_files": len(bundle.skipped),
    }
    if split_warning is not None:
        extra["warning"] = split_warning  # report.json carries it with the numbers it qualifies
    report = reports.build_report(result, meta.labels, extra)
    if out is not None:
        reports.write_all(out, result, meta.labels, extra)
    return report


def read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--labels {path}: {e.strerror}") from None
    labels = (
        json.loads(text) if path.suffix == ".json" else [s.strip() for s in text.splitlines() if s.strip()]
    )
    if not isinstance(labels, list) or not labels or not all(isinstance(s, str) for s in labels):
        raise ConfigError(f"--labels {path} must list class names, one per line (or a JSON list of strings)")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--labels {path} repeats a class name; each class needs its own")
    return labels


def run_export(
    cfg: TrainConfig, num_classes: int | None, labels_file: Path | None, out: Path, version: str
) -> CheckpointMeta:
    """A serving checkpoint with random or given weights, no training."""
    labels = read_labels(labels_file) if labels_file else None
    if labels is None:
        if not num_classes or num_classes < 1:
            raise ConfigError("export needs --num-classes N (at least 1) or --labels FILE")
        labels = [f"class_{i}" for i in range(num_classes)]
    elif num_classes is not None and num_classes != len(labels):
        raise ConfigError(f"--num-classes {num_classes} but --labels lists {len(labels)} classes; give one")
    arch_config, pre = build_network(cfg, DataSpec("folder"))  # "folder": no data-set specific input size
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, len(labels), pre.channels, pre.size, arch_config or None)
    if cfg.init_weights:
        skipped = load_init_weights(model, Path(cfg.init_weights))
        if skipped:
            log.warning("re-initialised head tensors %s: the weights have a different class count", skipped)
    training = {
        "exported": True,
        "init_weights": Path(cfg.init_weights).name if cfg.init_weights else None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    meta = CheckpointMeta(
        arch=cfg.arch,
        labels=labels,
        preprocess=pre.to_dict(),
        arch_config=arch_config,
        training=training,
        name=cfg.name or out.stem,
        version=version,
    )
    return save_checkpoint(out, model, meta)


def _torchvision_rows(model: nn.Module, shape: tuple[int, int, int]) -> list[tuple[str, str, int]]:
    """(name, output shape, params) per top-level block, found with forward hooks."""
    rows: list[tuple[str, str, int]] = []
    blocks: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        expand = isinstance(child, nn.Sequential) and len(child) > 1
        blocks += [(f"{name}.{n}", c) for n, c in child.named_children()] if expand else [(name, child)]
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, o, n=n, m=m: rows.append(
                (n, "x".join(map(str, tuple(o.shape[1:]))), sum(p.numel() for p in m.parameters()))
            )
        )
        for n, m in blocks
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return rows


def describe(cfg: TrainConfig, num_classes: int) -> str:
    """Per-layer output shape, parameters and receptive field, and what dense layers would cost."""
    arch_config, pre = build_network(cfg, DataSpec("folder"))
    model = build_model(cfg.arch, num_classes, pre.channels, pre.size, arch_config or None)
    total = sum(p.numel() for p in model.parameters())
    shape = pre.input_shape
    lines = [f"{cfg.arch}: input {shape[0]}x{shape[1]}x{shape[2]} (CxHxW), {num_classes} classes"]
    if isinstance(model, SpecCNN):
        lines.append(f"network: {format_network(arch_config)}")
        lines.append("")
        lines.append(
            f"{'#':>3}  {'layer':<16}{'output (CxHxW)':<18}{'params':>12}{'recept. field':>15}"
            f"{'dense equivalent':>20}"
        )
        for i, row in enumerate(model.layer_table):
            dense = f"{row.dense_equivalent:,}" if row.dense_equivalent else ""
            rf = f"{row.receptive_field}x{row.receptive_field}" if row.receptive_field else ""
            lines.append(
                f"{i:>3}  {row.name:<16}{'x'.join(map(str, row.out_shape)):<18}{row.params:>12,}"
                f"{rf:>15}{dense:>20}"
            )
        convs = [r for r in model.layer_table if r.dense_equivalent]
        conv_params = sum(r.params for r in convs)
        dense_params = sum(r.dense_equivalent for r in convs)
        lines += [
            "",
            f"total parameters: {total:,}",
            f"conv layers: {conv_params:,} parameters; fully connected layers with the same input and "
            f"output shapes would need {dense_params:,} weights "
            f"({dense_params / max(1, conv_params):,.0f}x): "
            "weight sharing is why convolutions scale to images.",
        ]
        flat = math.prod(shape)
        lines.append(
            f"(a single dense layer from the raw {flat:,} input values to {num_classes} classes alone: "
            f"{flat * num_classes + num_classes:,} parameters, and no translation invariance)"
        )
    else:
        lines.append("")
        lines.append(f"{'block':<22}{'output (CxHxW)':<20}{'params':>14}")
        for name, out, params in _torchvision_rows(model, shape):
            lines.append(f"{name:<22}{out:<20}{params:>14,}")
        lines += [
            "",
            f"total parameters: {total:,} (receptive fields are listed for our own CNNs: "
            f"{', '.join(sorted(SPEC_PRESETS))})",
        ]
    return "\n".join(lines)


def list_architectures() -> str:
    return "\n".join(f"{name:<20}{get_arch(name).description}" for name in list_models())
