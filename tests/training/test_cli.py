"""The CLI as a user runs it: evaluate, export, describe, and one-line errors for bad configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from model.preprocess import IMAGENET_MEAN
from model.registry import build_model, default_preprocess
from training.__main__ import main

from .conftest import make_image_folder, run_cli, tiny_flags


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", *tiny_flags(), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout and "best val accuracy" in proc.stdout
    return out


def test_evaluate_rebuilds_the_recorded_split(trained: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "evaluate",
        "--checkpoint",
        str(trained / "model.safetensors"),
        "--data",
        "shapes",
        "--out",
        str(tmp_path / "eval"),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    trained_report = json.loads((trained / "report.json").read_text())
    # same seed and sizes as recorded in the checkpoint -> the same 24 images and the same result
    assert report["samples"] == 24
    assert report["confusion_matrix"] == trained_report["confusion_matrix"]
    assert f"top-1 {report['top1']:.4f}" in proc.stdout and "circle" in proc.stdout
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()


def test_export_torchvision_gets_imagenet_preprocessing(tmp_path: Path) -> None:
    out = tmp_path / "r18.safetensors"
    proc = run_cli("export", "--arch", "resnet18", "--num-classes", "1000", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input_shape"] == [3, 224, 224]
    meta = read_meta(out)
    assert meta.num_classes == 1000 and meta.labels[0] == "class_0"
    assert meta.preprocess["size"] == 224 and meta.preprocess["resize"] == 256
    assert tuple(meta.preprocess["mean"]) == IMAGENET_MEAN
    assert meta.training["exported"] is True


def test_export_with_labels_and_init_weights(tmp_path: Path) -> None:
    source = build_model("convnet", 3)
    weights = tmp_path / "w.pth"
    torch.save(source.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\nbird\n")
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "export",
                "--arch",
                "convnet",
                "--labels",
                str(labels),
                "--init-weights",
                str(weights),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    loaded = load_checkpoint(out)
    assert loaded.meta.labels == ["cat", "dog", "bird"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), source.state_dict().values(), strict=True)
    )


def test_describe_prints_shapes_params_receptive_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "--arch", "convnet", "--num-classes", "8"]) == 0
    text = capsys.readouterr().out
    assert "conv 3x3x16 -> relu -> bn -> maxpool 2" in text
    assert "16x64x64" in text and "96x4x4" in text  # output shapes
    assert "46x46" in text  # receptive field after the last pool
    model = build_model("convnet", 8)
    assert f"total parameters: {sum(p.numel() for p in model.parameters()):,}" in text
    assert "fully connected layers with the same input and output shapes would need" in text


def test_describe_cli_for_a_torchvision_model_and_the_list() -> None:
    proc = run_cli("describe", "--arch", "mobilenet_v3_small", "--image-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert "total parameters" in proc.stdout and "classifier" in proc.stdout
    assert main(["describe", "--list"]) == 0


def test_bad_configuration_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_cli("train", "--arch", "resnet19", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: unknown architecture 'resnet19'; choose from [")
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_each_bad_configuration_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = tmp_path / "big-kernel.toml"
    net.write_text('network = "conv 9x9x8 pad valid -> maxpool 2 -> gap"\n')
    err = _error(capsys, "train", "--config", str(net), "--image-size", "8", "--out", str(tmp_path / "o"))
    assert "block 0 (conv): a 8x8 map with kernel 9" in err and "use a larger input, padding" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, "train", "--data", f"folder:{empty}", "--out", str(tmp_path / "o"))
    assert "has no class sub-folders; put images in" in err
    (empty / "cats").mkdir()
    err = _error(capsys, "train", "--data", f"folder:{empty}", "--out", str(tmp_path / "o"))
    assert "holds no readable images" in err
    err = _error(capsys, "train", "--data", "imagenet", "--out", str(tmp_path / "o"))
    assert "unknown data set 'imagenet'; use shapes, digits, folder:PATH" in err
    err = _error(capsys, "train", "--data", f"cifar10:{tmp_path}", "--out", str(tmp_path / "o"))
    assert "no cifar10 data under" in err and "never downloads" in err
    err = _error(capsys, "export", "--arch", "convnet", "--out", str(tmp_path / "m.safetensors"))
    assert "--num-classes N" in err
    err = _error(capsys, "train", "--epochs", "0")
    assert "--epochs must be at least 1" in err
    err = _error(capsys, "train", "--resume", str(tmp_path / "nope.pt"))
    assert "no such file" in err
    pickle = tmp_path / "model.pt"
    torch.save({"a": 1}, pickle)
    err = _error(capsys, "evaluate", "--checkpoint", str(pickle), "--data", "shapes")
    assert "pickle-based" in err


def test_evaluate_a_folder_with_a_subset_of_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pre = default_preprocess("convnet")
    model = build_model("convnet", 4, image_size=pre.size)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model, CheckpointMeta("convnet", ["blue", "green", "red", "yellow"], pre.to_dict()))
    folder = make_image_folder(tmp_path / "imgs", per_class=2, corrupt=0)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", f"folder:{folder}"]) == 0
    assert "yellow" in capsys.readouterr().out
    (folder / "purple").mkdir()
    (folder / "purple" / "a.png").write_bytes((folder / "red" / "1.png").read_bytes())
    err = _error(capsys, "evaluate", "--checkpoint", str(ckpt), "--data", f"folder:{folder}")
    assert "data classes ['purple'] are not among the checkpoint's labels" in err


SPLIT_CHANGED = (
    "the validation split differs from the one this model was trained with: the data changed since "
    "training, so validation images may have been trained on; accuracy may be inflated"
)


def _folder_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A one-epoch run on a fresh image folder split by seed: (folder, run directory)."""
    folder = make_image_folder(tmp_path / "imgs", per_class=6, corrupt=0)
    out = tmp_path / "run"
    flags = tiny_flags(data=f"folder:{folder}", image_size=16, batch_size=8, crop_scale=0.0, rotation=0.0)
    assert main(["train", *flags, "--out", str(out)]) == 0
    capsys.readouterr()
    return folder, out


def test_evaluate_warns_when_the_data_changed_since_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, run = _folder_run(tmp_path, capsys)
    assert read_meta(run / "model.safetensors").training["val_digest"]
    evaluate = ["evaluate", "--checkpoint", str(run / "model.safetensors")]
    assert main([*evaluate, "--out", str(tmp_path / "same")]) == 0
    assert "validation split differs" not in capsys.readouterr().out  # same files: the recorded split
    assert "warning" not in json.loads((tmp_path / "same" / "report.json").read_text())
    # one more file in the first class reshuffles that class and every later one under the same seed
    (folder / "blue" / "extra.png").write_bytes((folder / "blue" / "1.png").read_bytes())
    assert main([*evaluate, "--out", str(tmp_path / "changed")]) == 0
    assert SPLIT_CHANGED in capsys.readouterr().out
    assert json.loads((tmp_path / "changed" / "report.json").read_text())["warning"] == SPLIT_CHANGED
    assert SPLIT_CHANGED in (tmp_path / "changed" / "report.md").read_text()
    # an explicit other seed draws other images too, and the warning names that cause instead
    (folder / "blue" / "extra.png").unlink()
    assert main([*evaluate, "--seed", "1"]) == 0
    assert "differs from the one this model was trained with: --seed changed since training" in (
        capsys.readouterr().out
    )


def test_resume_refuses_a_changed_split_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, run = _folder_run(tmp_path, capsys)
    state = str(run / "train_state.pt")
    recorded = read_meta(run / "model.safetensors").training["val_digest"]
    (folder / "blue" / "extra.png").write_bytes((folder / "blue" / "1.png").read_bytes())
    err = _error(capsys, "train", "--resume", state, "--epochs", "2")
    assert SPLIT_CHANGED in err and "--allow-split-change" in err
    assert main(["train", "--resume", state, "--epochs", "2", "--allow-split-change"]) == 0
    assert f"{SPLIT_CHANGED} (resuming anyway" in capsys.readouterr().out
    # the first split's digest is kept: the model trained on images the new split validates on
    meta = read_meta(run / "last.safetensors")
    assert meta.training["epochs"] == 2 and meta.training["val_digest"] == recorded
