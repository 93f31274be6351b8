"""TrainConfig layering (defaults < config file < flags), the generated CLI, and network specs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from model.architectures import CONVNET, SpecCNN
from model.registry import build_model
from training.config import ConfigError, TrainConfig, add_train_arguments, build_config
from training.netspec import format_network, parse_network

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return vars(parser.parse_args(list(argv)))


def test_cli_has_a_flag_per_field_and_only_given_flags_override() -> None:
    assert parse() == {}
    given = parse("--epochs", "3", "--lr", "0.1", "--no-amp", "--optimizer", "adamw", "--data", "digits")
    assert given == {"epochs": 3, "lr": 0.1, "amp": False, "optimizer": "adamw", "data": "digits"}
    with pytest.raises(SystemExit):
        parse("--schedule", "linear")  # choices come from the dataclass


def test_config_file_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'epochs = 9\nlr = 1\nnetwork = "conv 3x3x8 -> relu -> maxpool 2 -> gap"\n[preprocess]\nsize = 40\n'
    )
    cfg = build_config({"config": f, "epochs": 2})
    assert cfg.epochs == 2 and cfg.lr == 1.0  # flag beats file; int accepted for a float
    assert cfg.preprocess == {"size": 40} and isinstance(cfg.network, str)
    assert build_config({}) == TrainConfig()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"epochs": 3, "colour": 1}', "unknown settings \\['colour'\\]"),
        ('{"epochs": "three"}', "'epochs' must be of type int"),
        ('{"epochs": 0}', "--epochs must be at least 1"),
        ("{not json", "does not parse"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        build_config({"config": f})


def test_compact_network_is_the_default_cnn() -> None:
    text = (REPO / "configs" / "convnet.toml").read_text()
    compact = build_config({"config": REPO / "configs" / "convnet.toml"}).network
    assert "conv 3x3x16" in text
    assert parse_network(compact) == parse_network(CONVNET)
    assert json.loads((REPO / "configs" / "convnet.json").read_text())["network"]["head"]["dense"] == [64]
    assert parse_network(format_network(CONVNET)) == parse_network(CONVNET)


def test_compact_network_options_build_the_right_layers() -> None:
    net = parse_network(
        "conv 5x5x8 stride 2 pad 2 -> bn -> gelu -> avgpool 3 stride 2 -> dropout 0.1 -> "
        "conv 3x3x16 dilation 2 -> flatten -> dense 32 -> tanh -> dropout 0.3"
    )
    assert net["blocks"][0] == {"type": "conv", "kernel": 5, "out": 8, "stride": 2, "padding": 2}
    assert net["blocks"][3] == {"type": "avgpool", "kernel": 3, "stride": 2}
    assert net["head"] == {"pool": "flatten", "dense": [32], "activation": "tanh", "dropout": 0.3}
    model = build_model("convnet", 4, 3, 32, net)
    assert isinstance(model, SpecCNN)
    # 32 -> conv s2 -> 16 -> avgpool 3 s2 -> 7 -> dilated 3x3 'same' keeps 7
    assert model.layer_table[5].out_shape == (16, 7, 7)


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("conv 3x5x8", "square kernel"),
        ("conv 3x3x8 -> swish", "unknown step"),
        ("gap -> dense 4", "no blocks"),
        ("conv 3x3x8 -> gap -> conv 3x3x8", "after gap/flatten"),
        ("conv 3x3x8 size 3", "unknown option 'size'"),
        (42, "must be a string"),
    ],
)
def test_bad_network_specs(network: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_network(network)
