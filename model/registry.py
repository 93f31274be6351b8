"""Architecture name -> builder, default config and default preprocessing. Errors are loud."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.architectures import (
    SPEC_PRESETS,
    TORCHVISION_HEADS,
    build_spec_cnn,
    build_torchvision,
)
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

log = logging.getLogger(__name__)

Builder = Callable[[int, int, int, dict[str, Any] | None], nn.Module]


@dataclass(frozen=True)
class Arch:
    name: str
    build: Builder  # (num_classes, in_channels, image_size, config) -> module
    default_config: dict[str, Any]
    default_preprocess: Preprocess
    description: str


def _spec(name: str, description: str, preprocess: Preprocess) -> Arch:
    def build(n: int, c: int, s: int, cfg: dict[str, Any] | None) -> nn.Module:
        return build_spec_cnn(name, n, c, s, cfg)

    return Arch(name, build, SPEC_PRESETS[name], preprocess, description)


def _tv(name: str, description: str) -> Arch:
    def build(n: int, c: int, s: int, cfg: dict[str, Any] | None) -> nn.Module:
        return build_torchvision(name, n, c)

    # ImageNet-style eval: resize the short side to 256, center crop 224, ImageNet statistics.
    imagenet = Preprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Arch(name, build, {}, imagenet, description)


_SMALL = Preprocess(size=64, resize=64)
_ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        _spec("convnet", "default small CNN: 4 x (conv3x3 -> relu -> bn -> maxpool), GAP, dense", _SMALL),
        _spec("lenet5", "LeNet-5: 2 x (conv5x5 -> tanh -> avgpool), 120-84 dense", Preprocess(32, 32)),
        _spec("vgg_small", "VGG-style: 3 x (2 x conv3x3 -> relu -> bn, maxpool), GAP, dense", _SMALL),
        *(_tv(name, f"torchvision {name}") for name in TORCHVISION_HEADS),
    ]
}
DEFAULT_ARCH = "convnet"


def list_models() -> list[str]:
    return sorted(_ARCHS)


def get_arch(name: str) -> Arch:
    if name not in _ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {list_models()}")
    return _ARCHS[name]


def default_config(name: str) -> dict[str, Any]:
    return copy.deepcopy(get_arch(name).default_config)


def default_preprocess(name: str) -> Preprocess:
    return get_arch(name).default_preprocess


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 64,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Build `arch` with random weights; `config` overrides the preset (our CNNs only)."""
    return get_arch(arch).build(num_classes, in_channels, image_size, config)


def load_init_weights(model: nn.Module, path: Path) -> list[str]:
    """Load local weights (e.g. ImageNet weights the user downloaded) into `model`.

    Safetensors files load directly; `.pth` files load with `weights_only=True`, which refuses any
    pickled object that is not plain tensors and containers, so no code in the file can run.
    Head tensors whose shape does not match (a different class count) are skipped and re-initialised;
    returns the names skipped so the caller can report them.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--init-weights: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = raw["state_dict"] if isinstance(raw, dict) and "state_dict" in raw else raw
    own = model.state_dict()
    head_keys = {k for k in own if any(k.startswith(p + ".") for p in ("head", "fc", "classifier"))}
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k in head_keys]
    for k in skipped:
        del state[k]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches outside the head
        raise ValueError(f"--init-weights {path} does not fit {type(model).__name__}: {e}") from None
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"--init-weights {path} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    if skipped:
        log.info("init weights: re-initialised head tensors %s (class count differs)", skipped)
    return skipped
