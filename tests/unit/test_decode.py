"""service.decode: every image kind a client sends -> the model's channels, or an error with its code."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from model.preprocess import Preprocess
from service.decode import ALLOWED_FORMATS, decode_image, decode_to_tensor
from service.errors import ERROR_CODES, ImageError, error_table_markdown
from tests import images

MAX_PIXELS = 40_000_000
RGB_PRE = Preprocess(size=64, channels=3)  # a 96x64 JPEG stays full size (no draft)
GREY_PRE = Preprocess(size=64, channels=1)
Q = images.QUADRANTS
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
LUMA = {k: round(0.299 * r + 0.587 * g + 0.114 * b) for k, (r, g, b) in Q.items()}  # ITU-R 601, as Pillow


def quadrant_pixels(img: Image.Image) -> dict[str, tuple[int, ...]]:
    """The pixel at the centre of each quadrant, as a tuple (length 1 for 'L')."""
    w, h = img.size
    points = {
        "top_left": (w // 4, h // 4),
        "top_right": (3 * w // 4, h // 4),
        "bottom_left": (w // 4, 3 * h // 4),
        "bottom_right": (3 * w // 4, 3 * h // 4),
    }
    out = {}
    for name, xy in points.items():
        px = img.getpixel(xy)
        out[name] = tuple(px) if isinstance(px, tuple) else (int(px),)  # type: ignore[arg-type]
    return out


def assert_quadrants(img: Image.Image, expected: Mapping[str, tuple[int, ...]], atol: int) -> None:
    got = quadrant_pixels(img)
    for name, want in expected.items():
        assert all(abs(a - b) <= atol for a, b in zip(got[name], want, strict=True)), (name, got, expected)


def expect(colours: dict[str, tuple[int, int, int]], channels: int) -> dict[str, tuple[int, ...]]:
    if channels == 3:
        return dict(colours)
    return {k: (round(0.299 * r + 0.587 * g + 0.114 * b),) for k, (r, g, b) in colours.items()}


GREYS = {k: (v, v, v) for k, v in LUMA.items()}
# (file, upright colours as RGB, tolerance in levels: lossy codecs get a margin, lossless none)
MODE_CASES: dict[str, tuple[Callable[[], bytes], dict[str, tuple[int, int, int]], int]] = {
    "jpeg_rgb": (images.jpeg, Q, 8),
    "cmyk_jpeg": (images.cmyk_jpeg, Q, 8),
    "png_rgb": (lambda: images.png("RGB"), Q, 0),
    "png_1": (
        lambda: images.png("1"),
        {"top_left": BLACK, "top_right": WHITE, "bottom_left": BLACK, "bottom_right": WHITE},
        0,
    ),
    "png_L": (lambda: images.png("L"), GREYS, 0),
    "png_I16": (lambda: images.png("I;16"), GREYS, 0),  # 16-bit scaled by 1/257, not clipped
    "tiff_F": (images.tiff_float, GREYS, 1),  # float 0..1 scaled to 0..255
    "png_P": (lambda: images.png("P"), Q, 0),
    # alpha cases: the left half is transparent and must come out as alpha_background (white)
    "png_RGBA": (lambda: images.png("RGBA"), {**Q, "top_left": WHITE, "bottom_left": WHITE}, 0),
    "png_LA": (lambda: images.png("LA"), {**GREYS, "top_left": WHITE, "bottom_left": WHITE}, 0),
    "png_P_transparent": (images.png_palette_transparent, {**Q, "top_left": WHITE}, 0),
    # CIELAB: LittleCMS writes it, Pillow's own LAB -> RGB is an approximation (measured <= 22 levels)
    "tiff_lab": (images.tiff_lab, Q, 24),
    "webp": (images.webp, Q, 0),
    "bmp": (images.bmp, Q, 0),
    "gif": (images.gif, Q, 0),
    "tiff": (images.tiff, Q, 0),
    "mpo": (images.mpo, Q, 8),
}


@pytest.mark.parametrize(
    ("case", "channels"),
    [
        (case, channels)
        for case in sorted(MODE_CASES)
        for channels in (3, 1)
    ],
)
def test_every_mode_becomes_the_checkpoints_channels(case: str, channels: int) -> None:
    make, colours, atol = MODE_CASES[case]
    pre = RGB_PRE if channels == 3 else GREY_PRE
    img = decode_image(make(), pre, MAX_PIXELS)
    assert img.mode == ("RGB" if channels == 3 else "L")
    assert img.size == (96, 64)
    assert_quadrants(img, expect(colours, channels), atol)
    tensor = decode_to_tensor(make(), pre, MAX_PIXELS)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == pre.input_shape


@pytest.mark.parametrize("background", [0, 128])
def test_alpha_is_composited_over_the_configured_background(background: int) -> None:
    pre = Preprocess(size=32, alpha_background=background)
    img = decode_image(images.png("RGBA"), pre, MAX_PIXELS)
    assert quadrant_pixels(img)["top_left"] == (background,) * 3
    assert quadrant_pixels(img)["top_right"] == Q["top_right"]  # opaque pixels untouched


def test_png_colour_key_transparency_follows_the_alpha_policy() -> None:
    img = decode_image(images.png_rgb_colour_key(), RGB_PRE, MAX_PIXELS)
    assert quadrant_pixels(img)["top_left"] == WHITE


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_puts_each_colour_where_the_viewer_sees_it(orientation: int) -> None:
    data = images.jpeg((96, 64), orientation=orientation)
    stored = Image.open(io.BytesIO(data)).size
    assert stored == ((64, 96) if orientation in (6, 8) else (96, 64))  # the file really is rotated
    img = decode_image(data, RGB_PRE, MAX_PIXELS)
    assert img.size == (96, 64)
    assert_quadrants(img, Q, atol=8)


@pytest.mark.parametrize("make", [images.animated_gif, images.animated_webp], ids=["gif", "webp"])
def test_animated_images_use_the_first_frame(make: Callable[[], bytes]) -> None:
    data = make()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) > 1
    img = decode_image(data, RGB_PRE, MAX_PIXELS)
    assert set(quadrant_pixels(img).values()) == {(255, 0, 0)}


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str | None, str, int]] = {
    "empty": (images.empty, None, "corrupt_image", 400),
    "garbage": (images.garbage, None, "corrupt_image", 400),
    "garbage_said_jpeg": (images.garbage, "image/jpeg", "corrupt_image", 400),
    "truncated_jpeg": (images.truncated_jpeg, "image/jpeg", "corrupt_image", 400),
    "truncated_png": (images.truncated_png, "image/png", "corrupt_image", 400),
    "text_unlabelled": (images.text_file, None, "corrupt_image", 400),
    "text_plain": (images.text_file, "text/plain", "unsupported_media_type", 415),
    "jpeg_said_text": (images.jpeg, "text/plain; charset=utf-8", "unsupported_media_type", 415),
    "jpeg_said_json": (images.jpeg, "application/json", "unsupported_media_type", 415),
    "ico": (images.ico, None, "unsupported_media_type", 415),
    "ico_said_png": (images.ico, "image/png", "unsupported_media_type", 415),
    "heic": (images.heic_header, "image/jpeg", "unsupported_media_type", 415),
    "garbage_said_heic": (images.garbage, "image/heic", "unsupported_media_type", 415),
    "bomb_20000x20000": (images.bomb_png, "image/png", "too_many_pixels", 413),  # Pillow's guard
    "bomb_10000x10000": (lambda: images.bomb_png(10000, 10000), None, "too_many_pixels", 413),  # ours
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_gets_its_code_and_status(case: str) -> None:
    make, content_type, code, status = BAD_INPUTS[case]
    with pytest.raises(ImageError) as info:
        decode_to_tensor(make(), RGB_PRE, MAX_PIXELS, content_type)
    assert (info.value.code, info.value.status) == (code, status), info.value.message
    assert ERROR_CODES[code].status == status
    assert info.value.message


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "image/jpeg",
        "IMAGE/JPEG; charset=binary",
        "image/png",
        "image/heic",
    ],
)
def test_declared_type_may_be_wrong_when_the_bytes_are_an_allowed_format(content_type: str | None) -> None:
    img = decode_image(images.jpeg(), RGB_PRE, MAX_PIXELS, content_type)
    assert_quadrants(img, Q, atol=8)


def test_pixel_limit_is_checked_from_the_header_before_any_pixel_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = images.png("RGB", (320, 240))

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as info:
        decode_image(data, RGB_PRE, max_pixels=320 * 240 - 1)
    assert (info.value.code, info.value.status) == ("too_many_pixels", 413)
    assert "320x240" in info.value.message
    monkeypatch.undo()
    assert decode_image(data, RGB_PRE, max_pixels=320 * 240).size == (320, 240)  # the limit is inclusive


def test_pillow_globals_are_left_alone() -> None:
    bomb_limit = Image.MAX_IMAGE_PIXELS
    for make in (images.jpeg, images.truncated_jpeg, images.bomb_png):
        with contextlib.suppress(ImageError):
            decode_image(make(), RGB_PRE, 1000)
    assert bomb_limit is not None and bomb_limit == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---- reduced-scale JPEG decode --------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return images.photo_jpeg((4000, 3000))


def full_decode(data: bytes, pre: Preprocess) -> torch.Tensor:
    """The same pipeline without the reduced-scale decode: loading first makes `draft` a no-op."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return pre.to_uint8(pre.prepare(img))


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess(size=224, resize=256),
        Preprocess(size=224, mode="squash"),
        Preprocess(size=224, mode="letterbox"),
        Preprocess(size=224, resize=256, channels=1),
    ],
    ids=["center_crop", "squash", "letterbox", "grey"],
)
def test_big_jpeg_is_decoded_at_reduced_scale_and_stays_close_to_a_full_decode(
    big_jpeg: bytes, pre: Preprocess
) -> None:
    img = decode_image(big_jpeg, pre, MAX_PIXELS)
    w, h = img.size
    assert w < 4000 and h < 3000  # decoded at 1/2, 1/4 or 1/8 scale, not in full
    if pre.mode == "center_crop":  # every pixel the geometry samples is still there
        assert min(w, h) >= (pre.resize or pre.size)
    elif pre.mode == "letterbox":
        assert max(w, h) >= pre.size
    else:
        assert min(w, h) >= pre.size
    diff = (decode_to_tensor(big_jpeg, pre, MAX_PIXELS).float() - full_decode(big_jpeg, pre).float()).abs()
    # Tolerance (docs/images.md): the JPEG decoder's DCT-domain downscale and Pillow's antialiased
    # resize are both box-like filters, so they agree to well under a level on average. Measured on
    # photo-like 4000x3000 content: mean 0.19-0.36, 99th percentile <= 2, max 5-11 (single pixels on
    # hard edges). Limits leave headroom for other libjpeg builds; the max is reported, not bounded.
    assert diff.mean() <= 1.0, f"mean {diff.mean():.3f} max {diff.max():.0f}"
    assert diff.flatten().quantile(0.99) <= 4, f"p99 {diff.flatten().quantile(0.99):.1f}"


def test_a_jpeg_the_geometry_barely_shrinks_is_decoded_in_full() -> None:
    data = images.photo_jpeg((640, 480))
    assert decode_image(data, Preprocess(size=224, resize=256), MAX_PIXELS).size == (640, 480)  # 1/2 < 256
    assert decode_image(data, Preprocess(size=224), MAX_PIXELS).size == (320, 240)  # 1/2 still >= 224


def test_camera_jpeg_with_a_preview_is_also_decoded_at_reduced_scale() -> None:
    photo = images.photo_image((2000, 1500))
    data = images.encode(photo, "MPO", save_all=True, append_images=[photo.resize((200, 150))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data, Preprocess(size=224, resize=256), MAX_PIXELS).size == (500, 375)


# ---- threads ---------------------------------------------------------------------------------------
def test_concurrent_decodes_match_serial_ones() -> None:
    kinds: list[Callable[[], bytes]] = [
        lambda: images.photo_jpeg((640, 480), seed=1),
        lambda: images.jpeg((96, 64), orientation=6),
        lambda: images.png("RGBA"),
        images.png_palette_transparent,
        images.animated_gif,
        images.webp,
        images.truncated_jpeg,
        lambda: images.photo_jpeg((1600, 1200), seed=2),
        images.garbage,
        images.tiff_float,
    ]
    inputs = [kinds[i % len(kinds)]() for i in range(50)]
    pre = Preprocess(size=64, resize=72)

    def run(data: bytes) -> torch.Tensor | str:
        try:
            return decode_to_tensor(data, pre, MAX_PIXELS)
        except ImageError as e:
            return e.code

    serial = [run(d) for d in inputs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(run, inputs))
    for one, other in zip(serial, threaded, strict=True):
        assert type(one) is type(other)
        assert one == other if isinstance(one, str) else torch.equal(one, other)  # type: ignore[arg-type]
    assert serial.count("corrupt_image") == 10


# ---- the error table --------------------------------------------------------------------------------
def test_image_error_status_comes_from_the_table() -> None:
    for code, entry in ERROR_CODES.items():
        assert ImageError(code, "x").status == entry.status
        assert entry.meaning.endswith(".")
    assert ImageError("unknown_code", "x").status == 400
    err = ImageError("bad_base64", "nope").with_index(3)
    assert (err.status, err.index, err.to_dict()) == (
        400,
        3,
        {"code": "bad_base64", "message": "nope", "index": 3},
    )
    assert "index" not in ImageError("corrupt_image", "x").to_dict()
    assert set(ALLOWED_FORMATS) == {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}


def test_docs_show_the_error_table_as_the_code_defines_it() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "images.md"
    assert error_table_markdown() in doc.read_text(), "regenerate with service.errors.error_table_markdown()"


def test_defer_above_reads_only_the_header_and_the_pixel_limit_comes_first() -> None:
    from service.decode import DecodeElsewhere

    data = images.jpeg((96, 64))
    assert decode_to_tensor(data, RGB_PRE, 10**6, defer_above=96 * 64).shape == (3, 64, 64)
    with pytest.raises(DecodeElsewhere, match="96x64"):
        decode_to_tensor(data, RGB_PRE, 10**6, defer_above=96 * 64 - 1)
    with pytest.raises(ImageError) as e:  # over the hard limit: refused, whoever would decode it
        decode_to_tensor(data, RGB_PRE, 100, defer_above=50)
    assert e.value.code == "too_many_pixels"
