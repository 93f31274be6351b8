"""Grad-CAM finds a layer in every registered architecture and yields a map of the layer's shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.registry import build_model, default_preprocess, list_models
from service.gradcam import ExplainModel, LayerNotFound, find_cam_layer

EXPECTED = {  # the last convolutional stage, by name, where it is well known
    "resnet18": "layer4",
    "resnet50": "layer4",
    "mobilenet_v3_small": "features",
    "efficientnet_b0": "features",
    "convnext_tiny": "features",
}


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_architecture_gets_a_cam_of_its_last_stage(arch: str) -> None:
    pre = default_preprocess(arch)
    torch.manual_seed(0)
    size = 64 if pre.size > 64 else pre.size  # torchvision nets run any size >= 32; keep it cheap
    model = build_model(arch, 5, pre.channels, size).eval()
    shape = (pre.channels, size, size)
    layer = find_cam_layer(model, shape)
    if arch in EXPECTED:
        assert layer == EXPECTED[arch]
    captured: list[torch.Tensor] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(torch.zeros((1, *shape)))
    handle.remove()
    spatial = tuple(captured[-1].shape[2:])
    assert spatial[0] * spatial[1] > 1

    explain = ExplainModel(model, shape, None)
    x = torch.randn((1, *shape))
    cam, logits, target = explain.grad_cam(x, None)
    assert tuple(cam.shape) == spatial
    assert logits.shape == (5,) and target == int(logits.argmax())
    assert torch.isfinite(cam).all() and float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert all(p.grad is None for p in model.parameters())  # autograd.grad leaves parameters alone


def test_our_cnn_uses_the_last_conv_stage_before_its_final_pooling() -> None:
    model = build_model("convnet", 3, 3, 64).eval()
    layer = find_cam_layer(model, (3, 64, 64))
    modules = dict(model.named_modules())
    assert not isinstance(modules[layer], nn.MaxPool2d)
    explain = ExplainModel(model, (3, 64, 64), None)
    cam, _, _ = explain.grad_cam(torch.randn(1, 3, 64, 64), 1)
    assert cam.shape == (8, 8)  # 64 / 2**3: the fourth stage's conv output, before its pooling


def test_a_checkpoint_may_name_its_layer_and_a_wrong_name_is_refused() -> None:
    model = build_model("resnet18", 3, 3, 64).eval()
    explain = ExplainModel(model, (3, 64, 64), "layer3")
    cam, _, _ = explain.grad_cam(torch.randn(1, 3, 64, 64), 0)
    assert cam.shape == (4, 4)
    with pytest.raises(LayerNotFound, match="layer9"):
        ExplainModel(model, (3, 64, 64), "layer9")


def test_grad_cam_works_inside_a_thread_that_never_entered_inference_mode() -> None:
    model = build_model("convnet", 3, 3, 64).eval()
    explain = ExplainModel(model, (3, 64, 64), None)
    with torch.inference_mode():  # a caller in inference mode: the explainer leaves it for its pass
        cam, _, _ = explain.grad_cam(torch.randn(1, 3, 64, 64), 0)
    assert cam.shape == (8, 8)


def test_feature_maps_report_the_convolution_geometry() -> None:
    model = build_model("resnet18", 3, 3, 64).eval()
    explain = ExplainModel(model, (3, 64, 64), None)
    fm = explain.feature_maps(torch.randn(1, 3, 64, 64), None)
    assert fm.layer == "conv1" and fm.kernel_size == (7, 7) and fm.stride == (2, 2) and fm.padding == (3, 3)
    assert tuple(fm.maps.shape) == (64, 32, 32)
    with pytest.raises(LayerNotFound, match="choose from"):
        explain.feature_maps(torch.randn(1, 3, 64, 64), "nope")
