"""The seeds' output-size arithmetic, checked against hand-computed cases, and spec validation."""

from __future__ import annotations

import pytest
import torch

from model.architectures import SpecCNN
from model.layers import SpecError, conv_output_size, resolve_padding


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "dilation", "expected"),
    [
        (5, 3, 1, 1, 1, 5),  # 3x3, padding 1, stride 1 keeps a 5x5 map 5x5
        (7, 3, 1, 0, 1, 5),  # no padding: 7 - 3 + 1
        (7, 3, 2, 0, 1, 3),  # stride 2: floor((7 - 3) / 2) + 1
        (8, 3, 2, 1, 1, 4),  # floor((8 + 2 - 2 - 1) / 2) + 1 = 4
        (7, 3, 1, 0, 2, 3),  # dilation 2: effective kernel 5
        (32, 5, 1, 0, 1, 28),  # LeNet-5's first layer
        (3, 5, 1, 0, 1, -1),  # kernel larger than the map: nothing left
    ],
)
def test_conv_output_size_hand_cases(
    size: int, kernel: int, stride: int, padding: int, dilation: int, expected: int
) -> None:
    assert conv_output_size(size, kernel, stride, padding, dilation) == expected


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "dilation"),
    [(5, 3, 1, 1, 1), (7, 3, 2, 0, 1), (9, 3, 1, 2, 2), (6, 4, 2, 1, 1)],
)
def test_formula_matches_pytorch(size: int, kernel: int, stride: int, padding: int, dilation: int) -> None:
    conv = torch.nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, dilation=dilation)
    out = conv(torch.zeros(1, 1, size, size))
    assert out.shape[-1] == conv_output_size(size, kernel, stride, padding, dilation)


def test_same_and_valid_padding() -> None:
    assert resolve_padding("valid", 3, 1, 1) == 0
    assert resolve_padding("same", 3, 1, 1) == 1
    assert resolve_padding("same", 5, 1, 1) == 2
    assert resolve_padding("same", 3, 1, 2) == 2  # dilation 2 widens the kernel to 5
    assert conv_output_size(11, 5, 1, resolve_padding("same", 5, 1, 1)) == 11
    with pytest.raises(SpecError, match="stride 1"):
        resolve_padding("same", 3, 2, 1)
    with pytest.raises(SpecError, match="padding must be"):
        resolve_padding("full", 3, 1, 1)


def _net(blocks: list[dict], size: int = 16, head: dict | None = None) -> SpecCNN:
    return SpecCNN(
        {"blocks": blocks, "head": head or {"pool": "gap"}}, num_classes=3, in_channels=3, image_size=size
    )


def test_shape_table_matches_real_forward() -> None:
    net = _net(
        [
            {"type": "conv", "out": 8, "kernel": 3, "padding": "same"},
            {"type": "relu"},
            {"type": "bn"},
            {"type": "maxpool", "kernel": 2},
            {"type": "conv", "out": 4, "kernel": 3, "stride": 2, "padding": "valid"},
        ],
        size=16,
        head={"pool": "flatten", "dense": [10]},
    )
    rows = {r.index: r for r in net.layer_table if not r.name.startswith("head")}
    assert rows[0].out_shape == (8, 16, 16)
    assert rows[3].out_shape == (8, 8, 8)
    assert rows[4].out_shape == (4, 3, 3)  # floor((8 - 3) / 2) + 1
    x = net.features(torch.zeros(1, 3, 16, 16))
    assert tuple(x.shape[1:]) == rows[4].out_shape
    # receptive field: 3, then pool 2 -> 4, then 3x3 at jump 2 -> 4 + 2*2 = 8
    assert [rows[i].receptive_field for i in (0, 3, 4)] == [3, 4, 8]
    # weight sharing: a 3x3x3->8 conv has 224 parameters; a dense layer between the same maps needs
    # (3*16*16) * (8*16*16) weights.
    assert rows[0].params == 3 * 3 * 3 * 8 + 8
    assert rows[0].dense_equivalent == (3 * 16 * 16) * (8 * 16 * 16)
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_layer_that_shrinks_map_to_nothing_is_named() -> None:
    with pytest.raises(SpecError, match=r"block 2 \(conv\): a 1x1 map with kernel 5.*gives -3x-3") as info:
        _net(
            [
                {"type": "conv", "out": 4, "kernel": 3, "stride": 2},
                {"type": "maxpool", "kernel": 2},
                {"type": "conv", "out": 4, "kernel": 5},
            ],
            size=8,
        )
    assert "larger input" in str(info.value)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([{"type": "conv", "kernel": 3}], "missing 'out'"),
        ([{"type": "conv", "out": 0}], "'out' must be an integer >= 1"),
        ([{"type": "spline"}], "unknown block type"),
        ([{"type": "dropout", "p": 1.5}], r"'p' must be in \[0, 1\)"),
        (["conv"], "must be an object"),
        ([], "non-empty 'blocks'"),
    ],
)
def test_bad_blocks_are_one_line_errors(blocks: list, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _net(blocks)


def test_head_validation() -> None:
    with pytest.raises(SpecError, match="'pool' must be"):
        _net([{"type": "relu"}], head={"pool": "max"})
    with pytest.raises(SpecError, match=r"no classes|at least 1"):
        SpecCNN({"blocks": [{"type": "relu"}]}, num_classes=0, in_channels=3, image_size=8)
