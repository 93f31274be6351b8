"""Parity: the service's decode path gives the tensor the training eval path gives, bit for bit.

Training evaluation opens files with `model.preprocess.open_image(path, pre)` and applies
`pre.eval_transform()`; the service runs `service.decode.decode_to_tensor(bytes, ...)` in its thread
pool and `pre.normalize` on the stacked batch. If either side grows its own resize, crop, channel
conversion, EXIF handling or reduced-scale decode, these tests fail.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.preprocess import Preprocess, open_image
from model.registry import build_model, default_preprocess
from service.decode import decode_to_tensor
from tests import images

FILES: dict[str, tuple[str, Callable[[], bytes]]] = {
    # a big photo with EXIF rotation: reduced-scale decode + orientation on both paths
    "jpeg_4000x3000_exif6": (".jpg", lambda: _rotated_photo_jpeg((4000, 3000))),
    "jpeg_640x480": (".jpg", lambda: images.photo_jpeg((640, 480), seed=3)),
    "png_rgba": (".png", lambda: images.png("RGBA", (320, 240))),
    "png_palette_transparent": (".png", lambda: images.png_palette_transparent((320, 240))),
    "png_16bit": (".png", lambda: images.png("I;16", (320, 240))),
    "gif_animated": (".gif", images.animated_gif),
}
PREPROCESS: dict[str, Preprocess] = {
    "convnet_default": default_preprocess("convnet"),
    "imagenet_224": Preprocess(size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "grey_letterbox": Preprocess(size=48, mode="letterbox", channels=1, fill=114, interpolation="bicubic"),
    "squash": Preprocess(size=96, mode="squash"),
}


def _rotated_photo_jpeg(size: tuple[int, int]) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    return images.encode(images.photo_image(size, seed=4), "JPEG", quality=90, exif=exif.tobytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    """Each test file both on disk (what training reads) and as bytes (what a client uploads)."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, (suffix, make) in FILES.items():
        data = make()
        path = root / f"{name}{suffix}"
        path.write_bytes(data)
        out[name] = (path, data)
    return out


def training_eval(path: Path, pre: Preprocess) -> torch.Tensor:
    return pre.eval_transform()(open_image(path, pre))  # (C, H, W) float


def service_path(data: bytes, pre: Preprocess) -> torch.Tensor:
    batch = torch.stack([decode_to_tensor(data, pre, 40_000_000, "application/octet-stream")])  # (1, C, H, W)
    return pre.normalize(batch)[0]


@pytest.mark.parametrize("pre_name", sorted(PREPROCESS))
@pytest.mark.parametrize("file_name", sorted(FILES))
def test_service_decode_equals_training_eval_transform(
    files: dict[str, tuple[Path, bytes]], file_name: str, pre_name: str
) -> None:
    pre = PREPROCESS[pre_name]
    path, data = files[file_name]
    expected = training_eval(path, pre)
    got = service_path(data, pre)
    assert got.shape == expected.shape == pre.input_shape
    assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max():.3g}"


@pytest.mark.parametrize("pre_name", ["convnet_default", "imagenet_224", "grey_letterbox"])
def test_both_paths_give_the_same_top1(files: dict[str, tuple[Path, bytes]], pre_name: str) -> None:
    pre = PREPROCESS[pre_name]
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=10, in_channels=pre.channels, image_size=pre.size).eval()
    names = sorted(files)
    train = torch.stack([training_eval(files[n][0], pre) for n in names])  # (N, C, H, W)
    serve = pre.normalize(torch.stack([decode_to_tensor(files[n][1], pre, 40_000_000) for n in names]))
    with torch.inference_mode():
        train_logits, serve_logits = model(train), model(serve)
    assert torch.equal(train_logits.argmax(1), serve_logits.argmax(1))
    torch.testing.assert_close(serve_logits, train_logits, rtol=0, atol=0)  # same input, same CPU kernels
