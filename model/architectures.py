"""Our CNNs, built from block specs, plus torchvision's with a head sized for the data set.

nn.Module only: no I/O and no preprocessing here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from model.layers import LayerShape, SpecError, build_features, build_head


class SpecCNN(nn.Module):
    """conv -> activation -> batch-norm -> pooling blocks, then a pooled/flattened dense head."""

    def __init__(self, config: dict[str, Any], num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        blocks = config.get("blocks")
        if not isinstance(blocks, list) or not blocks:
            raise SpecError("config needs a non-empty 'blocks' list")
        self.features, feature_rows, shape = build_features(blocks, in_channels, image_size)
        self.head, head_rows = build_head(config.get("head", {}), shape, num_classes)
        self.layer_table: list[LayerShape] = feature_rows + head_rows
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.features(x))


def _he_init(module: nn.Module) -> None:
    """He (Kaiming) init: keeps activations' variance stable through ReLU-family stacks."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv(out: int, kernel: int = 3, padding: int | str = "same") -> dict[str, Any]:
    return {"type": "conv", "out": out, "kernel": kernel, "padding": padding}


def _stage(out: int, convs: int = 1) -> list[dict[str, Any]]:
    """convs x (conv 3x3 -> relu -> bn), then 2x2 max pooling: the seeds' block."""
    layers: list[dict[str, Any]] = []
    for _ in range(convs):
        layers += [_conv(out), {"type": "relu"}, {"type": "bn"}]
    return [*layers, {"type": "maxpool", "kernel": 2}]


# The default: small enough to train on 2 CPU cores in about a minute, deep enough for 64x64 shapes.
CONVNET: dict[str, Any] = {
    "blocks": [*_stage(16), *_stage(32), *_stage(64), *_stage(96)],
    "head": {"pool": "gap", "dense": [64], "dropout": 0.1},
}
# LeCun et al. 1998: two 5x5 conv + pool stages, then 120-84 dense; designed for 32x32 inputs.
LENET5: dict[str, Any] = {
    "blocks": [
        _conv(6, 5, "valid"), {"type": "tanh"}, {"type": "avgpool", "kernel": 2},
        _conv(16, 5, "valid"), {"type": "tanh"}, {"type": "avgpool", "kernel": 2},
    ],
    "head": {"pool": "flatten", "dense": [120, 84], "activation": "tanh"},
}
VGG_SMALL: dict[str, Any] = {
    "blocks": [*_stage(32, 2), *_stage(64, 2), *_stage(128, 2), {"type": "dropout", "p": 0.1}],
    "head": {"pool": "gap", "dense": [128], "dropout": 0.3},
}
SPEC_PRESETS: dict[str, dict[str, Any]] = {"convnet": CONVNET, "lenet5": LENET5, "vgg_small": VGG_SMALL}

# torchvision models: which attribute holds the final classifier, so we can resize and freeze around it.
TORCHVISION_HEADS: dict[str, str] = {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v3_small": "classifier",
    "efficientnet_b0": "classifier",
    "convnext_tiny": "classifier",
}


def build_spec_cnn(
    preset: str, num_classes: int, in_channels: int, image_size: int, config: dict[str, Any] | None
) -> nn.Module:
    return SpecCNN(copy.deepcopy(config or SPEC_PRESETS[preset]), num_classes, in_channels, image_size)


def build_torchvision(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm  # imported lazily: the CLI starts faster for our own CNNs

    if in_channels != 3:
        raise SpecError(f"{arch} expects 3-channel input; set the preprocessing channels to 3")
    # weights=None always: nothing is ever downloaded. Pretrained weights come via --init-weights.
    model: nn.Module = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    return model


def head_module(model: nn.Module) -> nn.Module:
    """The classifier head of any registered model (ours: .head; torchvision: .fc or .classifier)."""
    for name in ("head", "fc", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise SpecError(f"cannot find the classifier head of {type(model).__name__}")


def freeze_backbone(model: nn.Module) -> int:
    """Freeze everything but the head, for transfer learning. Returns the trainable parameter count."""
    head_ids = {id(p) for p in head_module(model).parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_ids
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Put batch-norm layers whose affine parameters are frozen (freeze_backbone) in eval mode. Call
    after every `model.train()`: in train mode they would keep updating their running mean/variance
    from the new data, so a "frozen" backbone would still change what it computes at inference."""
    for m in model.modules():
        frozen = getattr(m, "weight", None) is not None and not m.weight.requires_grad
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and frozen:
            m.eval()


def output_classes(model: nn.Module) -> int:
    """Number of logits the model produces, read from its last Linear layer."""
    last = [m for m in head_module(model).modules() if isinstance(m, nn.Linear)]
    if not last:
        raise SpecError(f"{type(model).__name__} has no Linear classifier")
    return last[-1].out_features
