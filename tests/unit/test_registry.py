"""Every registered architecture: forward shape, finite output, and a gradient for every parameter."""

from __future__ import annotations

import pytest
import torch

from model.architectures import freeze_backbone, head_module, output_classes
from model.checkpoint import CheckpointMeta, save_checkpoint
from model.registry import build_model, default_preprocess, list_models, load_init_weights


@pytest.mark.parametrize("arch", list_models())
def test_forward_backward_every_parameter(arch: str) -> None:
    torch.manual_seed(0)
    pre = default_preprocess(arch)
    # torchvision models pool adaptively, so a small input keeps this test fast on two cores
    size = pre.size if pre.size <= 64 else 32
    model = build_model(arch, num_classes=5, in_channels=pre.channels, image_size=size)
    model.train()
    x = torch.randn(2, pre.channels, size, size)
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert output_classes(model) == 5


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet19'; choose from \[.*'resnet18'"):
        build_model("resnet19", 3)


def test_torchvision_needs_three_channels() -> None:
    with pytest.raises(ValueError, match="3-channel"):
        build_model("resnet18", 3, in_channels=1)


def test_freeze_backbone_leaves_only_the_head_trainable() -> None:
    model = build_model("resnet18", 4)
    trainable = freeze_backbone(model)
    assert trainable == sum(p.numel() for p in head_module(model).parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))


def test_init_weights_from_local_files(tmp_path) -> None:
    source = build_model("convnet", 10)
    # a torch.save'd state dict (what users download) loads through weights_only=True
    pth = tmp_path / "weights.pth"
    torch.save(source.state_dict(), pth)
    target = build_model("convnet", 3)  # different class count: head is re-initialised
    skipped = load_init_weights(target, pth)
    assert skipped and all(k.startswith("head.") for k in skipped)
    assert torch.equal(target.features[0].weight, source.features[0].weight)
    # and from a safetensors checkpoint
    st = tmp_path / "weights.safetensors"
    save_checkpoint(
        st,
        source,
        CheckpointMeta("convnet", [str(i) for i in range(10)], default_preprocess("convnet").to_dict()),
    )
    same = build_model("convnet", 10)
    assert load_init_weights(same, st) == []
    assert torch.equal(same.head[-1].weight, source.head[-1].weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_init_weights(build_model("lenet5", 10), st)
