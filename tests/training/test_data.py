"""Data sets: digits, MNIST/CIFAR-10 from a local root, folder layouts and splits, preprocessing choice."""

from __future__ import annotations

import logging
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model.preprocess import Augment, Preprocess, open_image
from model.registry import default_preprocess
from training.config import ConfigError, TrainConfig
from training.data import DataBundle, DataSpec, load_data, resolve_augment, resolve_preprocess
from training.folder import load_folder, stratified_split

from .conftest import make_image_folder


def test_digits_are_upscaled_grey_without_flips() -> None:
    pytest.importorskip("sklearn")
    cfg = TrainConfig(data="digits")
    spec = DataSpec.parse("digits")
    pre = resolve_preprocess(spec, default_preprocess("convnet"), cfg, own_cnn=True)
    assert (pre.size, pre.channels, pre.mode) == (32, 1, "squash")
    aug = resolve_augment(spec, cfg)
    assert aug.hflip == 0
    data = load_data(spec, pre, aug, cfg)
    assert data.labels == [str(d) for d in range(10)]
    assert len(data.train) + len(data.val) == 1797 and len(data.val) == pytest.approx(360, abs=5)
    x, y = data.train[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10
    # torchvision models keep their ImageNet input even for digits
    tv = resolve_preprocess(spec, default_preprocess("resnet18"), cfg, own_cnn=False)
    assert (tv.size, tv.channels) == (224, 3)


def _idx(path: Path, array: np.ndarray) -> None:
    """Write the IDX format MNIST ships in (magic: 0, 0, type 0x08 unsigned byte, ndim)."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_a_local_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    cfg = TrainConfig(data=f"mnist:{tmp_path}")
    spec = DataSpec.parse(cfg.data)
    pre = resolve_preprocess(spec, default_preprocess("convnet"), cfg, own_cnn=True)
    data = load_data(spec, pre, resolve_augment(spec, cfg), cfg)
    assert data.labels == [str(d) for d in range(10)]
    assert (len(data.train), len(data.val)) == (20, 10)
    assert data.val[3][0].shape == (1, 32, 32) and data.val[3][1] == 3


def test_config_size_without_resize_keeps_the_framing() -> None:
    """A config `[preprocess] size` alone scales the inherited resize like --image-size does."""
    spec = DataSpec.parse("shapes")

    def resolve(arch: str, own: bool, **kw: Any) -> tuple[int, int | None]:
        pre = resolve_preprocess(spec, default_preprocess(arch), TrainConfig(**kw), own_cnn=own)
        return pre.size, pre.resize

    # resnet18 is 224 of 256: at 128 it must look at the same share, not the central quarter of 256
    assert resolve("resnet18", False, preprocess={"size": 128}) == (128, 146)
    assert resolve("resnet18", False, preprocess={"size": 128}) == resolve("resnet18", False, image_size=128)
    # our CNNs on shapes are 64 of 64: size 96 used to fail "resize (64) must be >= size (96)"
    assert resolve("convnet", True, preprocess={"size": 96}) == (96, 96)
    # an explicit resize is kept, and --image-size still scales on top of the config file
    assert resolve("resnet18", False, preprocess={"size": 128, "resize": 160}) == (128, 160)
    assert resolve("resnet18", False, preprocess={"size": 128, "resize": 160}, image_size=64) == (64, 80)
    with pytest.raises(ConfigError, match="size must be a positive integer"):
        resolve("convnet", True, preprocess={"size": "big"})


def test_missing_torchvision_data_is_a_config_error(tmp_path: Path) -> None:
    cfg = TrainConfig(data=f"mnist:{tmp_path}")
    with pytest.raises(ConfigError, match="put the extracted MNIST/raw/ there"):
        load_data(DataSpec.parse(cfg.data), Preprocess(32, channels=1), None, cfg)


def test_train_val_folders_and_eval_transform_parity(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", per_class=4, corrupt=0)
    make_image_folder(tmp_path / "val", per_class=2, corrupt=2)
    pre = Preprocess(size=16, resize=18)
    split = load_folder(tmp_path, pre, 0.2, seed=0)
    assert (len(split.train), len(split.val), len(split.skipped)) == (12, 6, 2)
    cfg = TrainConfig(data=f"folder:{tmp_path}")
    data = load_data(DataSpec.parse(cfg.data), pre, Augment(), cfg)
    assert data.val is not None and data.train is not None
    # validation tensors are exactly what the service's decode path produces for the same file
    path = split.val[0][0]
    expected = pre.eval_transform()(open_image(path.read_bytes(), pre))
    assert torch.equal(data.val[0][0], expected)
    assert data.train[0][0].shape == (3, 16, 16)


def test_stratified_split_is_seeded_and_keeps_every_class() -> None:
    targets = [0] * 10 + [1] * 5 + [2] * 2
    train, val = stratified_split(targets, 0.2, seed=1)
    assert stratified_split(targets, 0.2, seed=1) == (train, val)
    assert stratified_split(targets, 0.2, seed=2) != (train, val)
    assert sorted(train + val) == list(range(17))
    assert [sum(targets[i] == c for i in val) for c in range(3)] == [2, 1, 1]


def test_data_spec_parsing() -> None:
    assert str(DataSpec.parse("folder:/x/y")) == "folder:/x/y"
    for bad, message in (
        ("folder", "needs a path"),
        ("shapes:/x", "takes no path"),
        ("svhn", "unknown data"),
    ):
        with pytest.raises(ConfigError, match=message):
            DataSpec.parse(bad)


@pytest.mark.parametrize(("ext", "fmt"), [("ppm", "PPM"), ("tga", "TGA"), ("ico", "ICO")])
def test_formats_the_service_refuses_are_skipped_with_the_reason(
    tmp_path: Path, ext: str, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Pillow reads these, but the service answers 415 for them: training on them would be wasted."""
    make_image_folder(tmp_path, per_class=4, corrupt=0)
    other = tmp_path / "red" / f"other.{ext}"
    Image.new("RGB", (20, 20), (220, 30, 30)).save(other)
    with caplog.at_level(logging.WARNING):
        split = load_folder(tmp_path, Preprocess(size=16), 0.25, seed=0)
    reason = f"{fmt} is not a format the service accepts (JPEG, PNG, WEBP, BMP, GIF, TIFF)"
    assert split.skipped == [(other, reason)]
    assert len(split.train) + len(split.val) == 12  # the PNG and JPEG files all kept
    assert f"{other} ({reason})" in caplog.text


def _folder_data(tmp_path: Path, augment: Augment | None) -> DataBundle:
    make_image_folder(tmp_path / "images", per_class=4, corrupt=0)
    cfg = TrainConfig(data=f"folder:{tmp_path / 'images'}", val_fraction=0.25)
    return load_data(DataSpec.parse(cfg.data), Preprocess(size=16, resize=18), augment, cfg)


def test_data_sets_pickle_and_give_the_same_samples(tmp_path: Path) -> None:
    """DataLoader workers under spawn/forkserver (macOS's default; Linux's from Python 3.14) receive the
    data set pickled; folder data always uses workers. Folder, in-memory lazy and cached sets all pickle."""
    folder = _folder_data(tmp_path, Augment())
    cfg = TrainConfig(data="shapes", train_size=4, val_size=4)
    shapes_data = load_data(DataSpec.parse("shapes"), Preprocess(size=16), Augment(), cfg)
    for ds in (folder.train, folder.val, shapes_data.train, shapes_data.val):
        assert ds is not None
        copy = pickle.loads(pickle.dumps(ds))
        assert len(copy) == len(ds)
        for i in (0, len(ds) - 1):
            torch.manual_seed(i)  # the training transforms draw their augmentations from torch's RNG
            x, y = ds[i]
            torch.manual_seed(i)
            cx, cy = copy[i]
            assert cy == y and torch.equal(cx, x)


def test_a_spawned_worker_loads_the_same_folder_batch(tmp_path: Path) -> None:
    data = _folder_data(tmp_path, None)  # eval transform only: the batch must not depend on worker seeds
    assert data.train is not None
    size = len(data.train)
    inline = next(iter(DataLoader(data.train, size, num_workers=0)))
    spawned = next(iter(DataLoader(data.train, size, num_workers=1, multiprocessing_context="spawn")))
    assert torch.equal(spawned[0], inline[0]) and torch.equal(spawned[1], inline[1])
