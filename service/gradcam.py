"""Grad-CAM and feature maps on a plain fp32 CPU copy of the model: torch only, no HTTP, no queue.

Grad-CAM (Selvaraju et al. 2017): the gradient of the target class's logit with respect to the
activation A of the last convolutional stage, averaged over space, weights A's channels; the ReLU of
the weighted sum is where the model looked. Implemented with a forward hook and
`torch.autograd.grad`, because:
- backward module hooks fail on torchvision's in-place ReLU / `+=` (a forward hook never sees them);
- `.backward()` would write `.grad` into parameters; autograd.grad writes nothing, and the copy's
  parameters do not require grad at all (the input does, so the graph still reaches the activation);
- gradients are impossible under `torch.inference_mode()`, so these functions must run on a thread
  that is not inside it (the explainer's own threads).
One permanent hook per layer stores its output in a thread-local slot, so several threads may run
the same model at once without seeing each other's activations and without a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
LAYER_KEY = "explain_layer"  # checkpoint arch_config key naming the Grad-CAM layer (a module path)


class LayerNotFound(ValueError):
    """The model has no usable convolutional layer, or a named layer does not exist."""


def find_cam_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The module path of the last convolutional stage, found by running one blank image.

    Every module's output is recorded in execution order (children before their parents). The last
    output that is still a spatial map (4-D, more than one pixel) is the end of the convolutional
    part; when a pooling layer produced it, its input is taken instead (the paper's "last conv
    layer": twice the resolution at the same semantics). Among the modules that returned that very
    tensor the outermost is named (`layer4`, not `layer4.1.relu`)."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                seen.append((name, m, out))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise LayerNotFound(f"{type(model).__name__} has no convolutional layer with a spatial output")
    last = seen[-1][2]
    group = [(n, m) for n, m, t in seen if t is last]
    if any(isinstance(m, _POOLS) for _, m in group):
        earlier = [(n, t) for n, _, t in seen if t is not last]
        if earlier:
            last = earlier[-1][1]
    return [n for n, _, t in seen if t is last][-1]


def conv_layers(model: nn.Module) -> list[str]:
    """Every Conv2d's module path, in definition order (the "Inside" view's choices)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@dataclass(frozen=True)
class FeatureMaps:
    layer: str
    maps: torch.Tensor  # (C, h, w) float32
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any  # tuple of ints, or "same"/"valid"
    in_channels: int
    out_channels: int


class ExplainModel:
    """An fp32 CPU copy of a model with permanent, thread-local capture hooks."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], cam_layer: str | None) -> None:
        self.model = model.float().cpu().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.input_shape = input_shape
        modules = dict(self.model.named_modules())
        self.cam_layer = cam_layer or find_cam_layer(self.model, input_shape)
        if self.cam_layer not in modules:
            raise LayerNotFound(f"{LAYER_KEY} {self.cam_layer!r} is not a module of this model")
        self.convs = conv_layers(self.model)
        self._local = threading.local()
        for name in {self.cam_layer, *self.convs}:
            modules[name].register_forward_hook(self._capture(name))

    def _capture(self, name: str) -> Any:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            if getattr(self._local, "want", None) == name:
                self._local.out = out

        return hook

    def _run(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._local.want, self._local.out = name, None
        try:
            logits = self.model(x)
            act = self._local.out
        finally:
            self._local.want = self._local.out = None
        if not isinstance(act, torch.Tensor):
            raise LayerNotFound(f"layer {name!r} did not run on this input")
        return logits, act

    def grad_cam(self, x: torch.Tensor, target: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x: (1, C, H, W) normalised float32. Returns (cam (h, w) in [0, 1], logits (K,), target)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            logits, act = self._run(self.cam_layer, x)  # act: (1, C', h, w)
            target = int(logits[0].argmax()) if target is None else target
            (grad,) = torch.autograd.grad(logits[0, target], act)
        weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C', 1, 1)
        cam = torch.relu((weights * act.detach()).sum(dim=1))[0]  # (h, w)
        top = float(cam.max())
        cam = cam / top if top > 0 else cam
        return cam, logits.detach()[0], target

    def feature_maps(self, x: torch.Tensor, layer: str | None) -> FeatureMaps:
        if not self.convs:
            raise LayerNotFound("the model has no Conv2d layer")
        name = layer or self.convs[0]
        if name not in self.convs:
            raise LayerNotFound(f"no convolution {name!r}; choose from {self.convs}")
        with torch.no_grad():
            _, act = self._run(name, x)
        conv = dict(self.model.named_modules())[name]
        assert isinstance(conv, nn.Conv2d)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return FeatureMaps(
            name, act[0].float(), tuple(conv.kernel_size), tuple(conv.stride), padding,
            conv.in_channels, conv.out_channels,
        )
