"""The CNN building blocks as plain specs, and the output-size arithmetic that validates them.

A network is a list of block specs (dicts, so a user can write them in JSON or TOML):

    {"type": "conv", "out": 32, "kernel": 3, "stride": 1, "padding": "same", "dilation": 1}
    {"type": "bn"}
    {"type": "relu"}                       # or leaky_relu, gelu, silu, tanh, sigmoid
    {"type": "maxpool", "kernel": 2}       # or avgpool; stride defaults to kernel
    {"type": "dropout", "p": 0.25}

followed by a head {"pool": "gap" | "flatten", "dense": [128], "dropout": 0.2, "activation": "relu"}.
Everything here is checked against the input size before a single weight is allocated, so a layer
that shrinks the feature map to nothing is a one-line error naming the layer and the sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
POOLS = ("maxpool", "avgpool")
BLOCK_TYPES = ("conv", "bn", "dropout", *POOLS, *ACTIVATIONS)


class SpecError(ValueError):
    """A network spec that cannot work; the message names the layer and the fix."""


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """The seeds' formula: H_out = floor((H + 2p - d(k-1) - 1) / s) + 1."""
    return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1


def resolve_padding(padding: int | str, kernel: int, stride: int, dilation: int) -> int:
    """Turn 'valid'/'same'/int into the symmetric integer padding PyTorch applies."""
    if padding == "valid":
        return 0
    if padding == "same":
        total = dilation * (kernel - 1)
        if stride != 1 or total % 2:
            # PyTorch pads 'same' asymmetrically for even kernels, which a symmetric int cannot express.
            raise SpecError(
                f"padding 'same' needs stride 1 and an odd effective kernel (got kernel {kernel}, "
                f"stride {stride}, dilation {dilation}); give an integer padding instead"
            )
        return total // 2
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        return padding
    raise SpecError(f"padding must be 'same', 'valid' or an integer >= 0, got {padding!r}")


@dataclass(frozen=True)
class LayerShape:
    """One row of `describe`: what a layer does to the map, and what it costs."""

    index: int
    name: str
    out_shape: tuple[int, ...]  # (C, H, W) for maps, (F,) after the head's pooling
    params: int
    receptive_field: int  # input pixels (per side) one output unit sees
    dense_equivalent: int  # weights a fully connected layer with the same in/out shape would need


@dataclass
class _Tracker:
    channels: int
    height: int
    width: int
    rf: int = 1  # receptive field
    jump: int = 1  # input pixels between adjacent units of this map


def _int_field(spec: dict[str, Any], key: str, default: int | None, where: str, minimum: int = 1) -> int:
    value = spec.get(key, default)
    if value is None:
        raise SpecError(f"{where}: missing {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def build_features(
    blocks: list[dict[str, Any]], in_channels: int, image_size: int
) -> tuple[nn.Sequential, list[LayerShape], tuple[int, int, int]]:
    """Build the feature extractor, returning it, a per-layer shape table and the final (C, H, W)."""
    layers: list[nn.Module] = []
    rows: list[LayerShape] = []
    t = _Tracker(in_channels, image_size, image_size)
    for i, spec in enumerate(blocks):
        if not isinstance(spec, dict) or "type" not in spec:
            raise SpecError(f"block {i}: each block must be an object with a 'type', got {spec!r}")
        kind = spec["type"]
        where = f"block {i} ({kind})"
        before = (t.channels, t.height, t.width)
        if kind == "conv":
            out = _int_field(spec, "out", None, where)
            k = _int_field(spec, "kernel", 3, where)
            s = _int_field(spec, "stride", 1, where)
            d = _int_field(spec, "dilation", 1, where)
            p = resolve_padding(spec.get("padding", 0), k, s, d)
            layer: nn.Module = nn.Conv2d(t.channels, out, k, stride=s, padding=p, dilation=d, bias=True)
            _shrink(t, where, k, s, p, d)
            t.channels = out
        elif kind == "bn":
            layer = nn.BatchNorm2d(t.channels)
        elif kind in POOLS:
            k = _int_field(spec, "kernel", 2, where)
            s = _int_field(spec, "stride", k, where)
            p = _int_field(spec, "padding", 0, where, minimum=0)
            if p > k // 2:
                raise SpecError(f"{where}: padding {p} must be at most half the kernel {k}")
            layer = nn.MaxPool2d(k, s, p) if kind == "maxpool" else nn.AvgPool2d(k, s, p)
            _shrink(t, where, k, s, p, 1)
        elif kind == "dropout":
            prob = spec.get("p", 0.25)
            if not isinstance(prob, int | float) or not 0 <= prob < 1:
                raise SpecError(f"{where}: 'p' must be in [0, 1), got {prob!r}")
            layer = nn.Dropout2d(float(prob))
        elif kind in ACTIVATIONS:
            layer = ACTIVATIONS[kind]()
        else:
            raise SpecError(f"{where}: unknown block type; choose from {sorted(BLOCK_TYPES)}")
        layers.append(layer)
        after = (t.channels, t.height, t.width)
        rows.append(
            LayerShape(
                index=i,
                name=kind,
                out_shape=after,
                params=sum(p.numel() for p in layer.parameters()),
                receptive_field=t.rf,
                dense_equivalent=math.prod(before) * math.prod(after) if kind == "conv" else 0,
            )
        )
    return nn.Sequential(*layers), rows, (t.channels, t.height, t.width)


def _shrink(t: _Tracker, where: str, k: int, s: int, p: int, d: int) -> None:
    h = conv_output_size(t.height, k, s, p, d)
    w = conv_output_size(t.width, k, s, p, d)
    if h < 1 or w < 1:
        raise SpecError(
            f"{where}: a {t.height}x{t.width} map with kernel {k}, stride {s}, padding {p}, "
            f"dilation {d} gives {h}x{w}; use a larger input, padding, or fewer downsampling layers"
        )
    t.height, t.width = h, w
    t.rf += (k - 1) * d * t.jump
    t.jump *= s


def build_head(
    head: dict[str, Any], feature_shape: tuple[int, int, int], num_classes: int
) -> tuple[nn.Sequential, list[LayerShape]]:
    """Global-average-pool or flatten, then dense layers, then class logits (softmax is applied later)."""
    if num_classes < 1:
        raise SpecError("num_classes must be at least 1; does the data set have any classes?")
    c, h, w = feature_shape
    pool = head.get("pool", "gap")
    if pool == "gap":
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        width = c
    elif pool == "flatten":
        layers = [nn.Flatten()]
        width = c * h * w
    else:
        raise SpecError(f"head: 'pool' must be 'gap' or 'flatten', got {pool!r}")
    act = head.get("activation", "relu")
    if act not in ACTIVATIONS:
        raise SpecError(f"head: unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")
    dropout = float(head.get("dropout", 0.0))
    rows = [LayerShape(0, f"head:{pool}", (width,), 0, 0, 0)]
    for j, units in enumerate([*head.get("dense", []), num_classes]):
        if not isinstance(units, int) or units < 1:
            raise SpecError(f"head: dense sizes must be positive integers, got {units!r}")
        last = j == len(head.get("dense", []))
        if dropout and last:
            layers.append(nn.Dropout(dropout))
        linear = nn.Linear(width, units)
        layers.append(linear)
        if not last:
            layers.append(ACTIVATIONS[act]())
        name = "logits" if last else f"dense{j}"
        rows.append(LayerShape(j + 1, f"head:{name}", (units,), linear.weight.numel() + units, 0, 0))
        width = units
    return nn.Sequential(*layers), rows
