"""Preprocessing: geometry policies, channel conversion, normalisation, and its stored form."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from model.preprocess import Augment, Mode, Preprocess, open_image


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


@pytest.mark.parametrize(("w", "h"), [(640, 480), (480, 640), (300, 300), (97, 211)])
def test_center_crop_matches_torchvision_resize_then_crop(w: int, h: int) -> None:
    """We resample only the crop box; the result must match resize-then-crop, the textbook pipeline."""
    pre = Preprocess(size=224, resize=256)
    ours = pre.to_uint8(_gradient(w, h)).float()
    ref = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.PILToTensor()])(_gradient(w, h))
    assert ours.shape == ref.shape == (3, 224, 224)
    # Pillow resamples at sub-pixel box offsets; on a smooth gradient that moves values by a level or two.
    assert (ours - ref.float()).abs().max() <= 3


def test_squash_and_letterbox_geometry() -> None:
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    squash = Preprocess(size=32, mode="squash").to_uint8(img)
    assert squash.shape == (3, 32, 32) and bool((squash[0] == 255).all())
    box = Preprocess(size=32, mode="letterbox", fill=7).to_uint8(img)
    assert box.shape == (3, 32, 32)
    assert box[:, :8, :].eq(7).all() and box[:, -8:, :].eq(7).all()  # 200x100 -> 32x16, padded top/bottom
    assert box[0, 8:24, :].eq(255).all()


def test_normalize_is_the_textbook_formula_on_a_batch() -> None:
    pre = Preprocess(size=4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    expected = (batch.float() / 255 - mean) / std
    torch.testing.assert_close(pre.normalize(batch), expected, atol=1e-5, rtol=1e-5)
    assert pre.normalize(batch, torch.bfloat16).dtype == torch.bfloat16
    # one image or a batch of them: identical values (the server normalises batches)
    single = pre.eval_transform()(Image.fromarray(batch[0].permute(1, 2, 0).numpy()))
    assert torch.equal(single, pre.normalize(batch)[0])


def test_alpha_is_composited_over_white() -> None:
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = Preprocess(size=8).to_channels(img)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    grey = Preprocess(size=8, channels=1, alpha_background=0).to_channels(img)
    assert grey.mode == "L" and grey.getpixel((1, 1)) == 0


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    out = Preprocess(size=3, channels=1).to_channels(img)
    assert np.asarray(out).tolist() == [[0, 128, 255]]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # mode F, 0-1
    assert np.asarray(Preprocess(size=3).to_channels(f).convert("L")).tolist() == [[0, 128, 255]]


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    buf = io.BytesIO()
    _gradient(4000, 3000).save(buf, "JPEG", quality=90)
    pre = Preprocess(size=224, resize=256)
    img = open_image(buf.getvalue(), pre)
    assert img.size == (500, 375)  # 1/8 scale still leaves the short side >= 256
    assert pre.to_uint8(img).shape == (3, 224, 224)
    small = io.BytesIO()
    _gradient(640, 480).save(small, "JPEG")
    assert open_image(small.getvalue(), pre).size == (640, 480)  # 1/2 would drop below 256


def test_round_trip_and_validation() -> None:
    pre = Preprocess(size=224, resize=256, mode="letterbox", channels=1, mean=(0.5,), std=(0.25,))
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert pre.input_shape == (1, 224, 224)
    for bad, msg in [
        ({"size": 0}, "size"),
        ({"size": 64, "resize": 32}, "resize"),
        ({"mode": "zoom"}, "mode"),
        ({"channels": 2}, "channels"),
        ({"std": (0.0,)}, "std"),
        ({"mean": (1, 2)}, "mean"),
        ({"colour": 1}, "unknown preprocessing fields"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Preprocess.from_dict(bad)


def test_train_transform_augments_but_keeps_the_shape() -> None:
    pre = Preprocess(size=32)
    torch.manual_seed(0)
    t = pre.train_transform(Augment())
    img = _gradient(80, 60)
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)  # random crops / flips / jitter
    plain = pre.train_transform(Augment.none())(img)
    assert torch.equal(plain, pre.eval_transform()(img))


_CROP_ONLY = Augment(random_resized_crop=(1.0, 1.0), hflip=0.0, rotation=0.0, color_jitter=(0.0,) * 4)


@pytest.mark.parametrize("mode", ["letterbox", "squash"])
def test_train_crop_works_inside_the_eval_geometry(mode: Mode) -> None:
    """A whole-area random crop must give the eval tensor, letterbox bars included: no train/serve skew."""
    pre = Preprocess(size=32, mode=mode, fill=7)
    img = _gradient(160, 90)
    torch.manual_seed(0)
    train = pre.train_transform(_CROP_ONLY)(img)
    assert torch.equal(train, pre.eval_transform()(img))
    if mode == "letterbox":  # 160x90 -> 32x18, padded top and bottom
        bar = pre.normalize(torch.full((3, 7, 32), 7, dtype=torch.uint8))
        assert torch.equal(train[:, :7], bar) and torch.equal(train[:, -7:], bar)


def test_center_crop_train_crop_still_samples_the_source() -> None:
    """center_crop keeps torchvision's RandomResizedCrop on the source image (recorded runs rely on it)."""
    pre = Preprocess(size=32, resize=40)
    img = _gradient(160, 90)
    aug = Augment(random_resized_crop=(0.5, 1.0), hflip=0.0, rotation=0.0, color_jitter=(0.0,) * 4)
    torch.manual_seed(3)
    ours = pre.train_transform(aug)(img)
    torch.manual_seed(3)
    ref = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1.0)), v2.PILToTensor()])(img)
    assert torch.equal(ours, pre.normalize(ref))


@pytest.mark.parametrize("mode", ["center_crop", "letterbox", "squash"])
def test_transforms_pickle_and_give_the_same_tensors(mode: Mode) -> None:
    """DataLoader workers under spawn/forkserver receive the transforms pickled: they must survive it."""
    pre = Preprocess(size=32, resize=40 if mode == "center_crop" else None, mode=mode)
    img = _gradient(80, 60)
    for transform in (pre.eval_transform(), pre.train_transform(Augment())):
        copy = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(5)
        expected = transform(img)
        torch.manual_seed(5)
        assert torch.equal(copy(img), expected)
