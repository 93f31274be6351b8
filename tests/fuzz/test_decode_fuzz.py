"""Property tests of the decoder (service/decode.py) on random bytes and on mutated valid images of
every accepted format: a tensor of the checkpoint's shape, or an `ImageError` with a documented
code, never another exception."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.preprocess import Preprocess
from service.decode import decode_to_tensor
from service.errors import ImageError
from tests.fuzz.strategies import SETTINGS, VALID_IMAGES, any_bytes, assert_documented, image_bytes

PRE = Preprocess(size=16, resize=16, mode="squash", channels=3, mean=(0.5,), std=(0.25,))
GRAY = Preprocess(size=16, resize=20, mode="center_crop", channels=1, mean=(0.5,), std=(0.25,))
MAX_PIXELS = 4096
TYPES = st.sampled_from(
    [None, "image/jpeg", "image/png", "image/x-weird", "application/octet-stream", "text/html"]
)


def check(data: bytes, pre: Preprocess, content_type: str | None) -> None:
    try:
        out = decode_to_tensor(data, pre, MAX_PIXELS, content_type)
    except ImageError as e:
        assert_documented(e)
        return
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == (pre.channels, pre.size, pre.size)


@settings(**SETTINGS)
@given(data=any_bytes(VALID_IMAGES), pre=st.sampled_from([PRE, GRAY]), content_type=TYPES)
def test_decoder_on_random_and_mutated_images(data: bytes, pre: Preprocess, content_type: str | None) -> None:
    check(data, pre, content_type)


@settings(**{**SETTINGS, "max_examples": 60})
@given(
    fmt=st.sampled_from(["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]),
    w=st.integers(1, 90),
    h=st.integers(1, 90),
    mode=st.sampled_from(["RGB", "L"]),
)
def test_valid_images_of_any_size_decode_or_hit_the_pixel_limit(fmt: str, w: int, h: int, mode: str) -> None:
    data = image_bytes(fmt, (w, h), mode)
    try:
        out = decode_to_tensor(data, PRE, MAX_PIXELS, None)
    except ImageError as e:
        assert e.code == "too_many_pixels" and w * h > MAX_PIXELS, e
        return
    assert w * h <= MAX_PIXELS
    assert tuple(out.shape) == (3, 16, 16)
