"""Client bytes -> the model's uint8 input, with limits, format checks and clear errors.

The pixels go through `Preprocess.prepare` (first frame, reduced-scale JPEG decode, EXIF orientation,
channel conversion with the alpha policy) and `Preprocess.to_uint8`, exactly what training evaluation
uses via `model.preprocess.open_image`, so serving and evaluation see the same tensor (tests/unit/
test_parity.py). This module only adds what a server needs in front of that: which formats are
allowed, how big an image may be, and an `ImageError` with a stable code for everything that goes wrong.

Runs in the service's decode thread pool (a small upload on its event loop): no module state is
written after import, Pillow's globals (`MAX_IMAGE_PIXELS`, `LOAD_TRUNCATED_IMAGES`, warning
filters) are never touched.
"""

from __future__ import annotations

import io
import logging
from typing import Final

import torch
from PIL import Image, MpoImagePlugin, TiffImagePlugin, UnidentifiedImageError, WebPImagePlugin  # noqa: F401

from model.preprocess import SERVED_FORMATS, Preprocess
from service.errors import ImageError

logger = logging.getLogger(__name__)

# One list for training and serving: a folder data set skips the files the service would refuse.
ALLOWED_FORMATS: Final[tuple[str, ...]] = SERVED_FORMATS
# Pillow's JPEG opener returns format "MPO" for JPEGs carrying a multi-picture index (camera files
# with an embedded preview): it is a JPEG to the client, so it is accepted as one.
_ACCEPTED: Final[frozenset[str]] = frozenset({*ALLOWED_FORMATS, "MPO"})

# Declared Content-Types naming an allowed format (including common non-standard spellings).
IMAGE_MEDIA_TYPES: Final[dict[str, str]] = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/png": "PNG",
    "image/x-png": "PNG",
    "image/apng": "PNG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
    "image/x-tiff": "TIFF",
}
# Types that say nothing about the bytes: sniff. curl's `--data-binary` sends form-urlencoded unless
# told otherwise, so refusing it would fail the most common first try for no benefit.
_UNSPECIFIED_TYPES: Final[frozenset[str]] = frozenset(
    {"", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded"}
)

# Image formats we recognise but do not serve, so the client gets 415 naming the format rather than
# "corrupt". Plain prefix checks only: no third-party parser ever sees the bytes.
_OTHER_FORMATS: Final[tuple[tuple[int, bytes, str], ...]] = (
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"icns", "ICNS"),
    (0, b"qoif", "QOI"),
    (0, b"DDS ", "DDS"),
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (4, b"jP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (4, b"JXL \r\n\x87\n", "JPEG XL"),
)
_HEIF_BRANDS: Final[dict[bytes, str]] = {
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"), "HEIC/HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
}

# Register the served formats' plugins once, at import, not lazily from racing decode threads. Only
# those: Image.init() would import all ~45 of Pillow's plugins (20-30 ms of cold start), and with every
# format of `formats=` registered, Image.open never calls it. TIFF, WebP and MPO (which JPEG's opener
# returns for multi-picture files) are imported above; preinit() adds BMP, GIF, JPEG, PPM and PNG.
Image.preinit()

if missing := [f for f in ALLOWED_FORMATS if f not in Image.OPEN]:
    raise ImportError(f"no Pillow plugin registered for the served format(s) {missing}")


class DecodeElsewhere(Exception):
    """The header names more pixels than `defer_above`: the caller decodes this image on another
    thread (the service decodes small uploads on its event loop, large ones in its pool)."""


def decode_image(
    data: bytes,
    preprocess: Preprocess,
    max_pixels: int,
    content_type: str | None = None,
    defer_above: int | None = None,
) -> Image.Image:
    """Bytes -> prepared PIL image (upright, first frame, in `preprocess`'s channels, fully decoded).

    Raises ImageError: unsupported_media_type (415), too_many_pixels (413), corrupt_image (400);
    DecodeElsewhere when the image is within `max_pixels` but above `defer_above` (only the header
    has been read then).
    """
    declared = _declared_type(content_type)
    if not data:
        raise ImageError("corrupt_image", "the image data is empty (0 bytes)")
    img = _open(data, declared)
    width, height = img.size  # from the header: no pixel has been decoded yet
    if width < 1 or height < 1:
        img.close()
        raise ImageError("corrupt_image", f"the {img.format} header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        img.close()
        raise ImageError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    if defer_above is not None and width * height > defer_above:
        img.close()
        raise DecodeElsewhere(f"{width}x{height}")
    try:
        prepared = preprocess.prepare(img)
        prepared.load()  # force the whole decode here, so a truncated file fails now, not in the batch
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        img.close()
        raise ImageError(
            "too_many_pixels", f"Pillow's decompression-bomb guard refused the image: {e}"
        ) from None
    except Exception as e:  # a client's bytes: any decoder failure is their 400, never our 500
        logger.debug("decode failed for a %s image", img.format, exc_info=True)
        img.close()
        raise ImageError("corrupt_image", f"the {img.format} image could not be decoded: {e}") from None
    if prepared is not img:  # prepare() returns a new image; the source's buffers can go now
        img.close()
    return prepared


def decode_to_tensor(
    data: bytes,
    preprocess: Preprocess,
    max_pixels: int,
    content_type: str | None = None,
    defer_above: int | None = None,
) -> torch.Tensor:
    """Bytes -> (C, H, W) uint8 tensor after the geometry step; `preprocess.normalize` runs per batch.
    `defer_above`: see decode_image."""
    img = decode_image(data, preprocess, max_pixels, content_type, defer_above)
    try:
        return preprocess.to_uint8(img)  # (C, H, W) uint8
    except Exception as e:
        # A decoded image that the geometry step cannot take points at our code, so keep the
        # traceback, but the request still gets a 400 rather than failing as a server error.
        logger.warning("preprocessing failed for a decoded %s %s image", img.size, img.mode, exc_info=True)
        raise ImageError("corrupt_image", f"the image could not be preprocessed: {e}") from None


def _declared_type(content_type: str | None) -> str | None:
    """The media type the client declared, or None when it declared nothing useful (then: sniff).

    A declared allowed or unknown image/* type does not bind: clients and proxies mislabel images all
    the time, so the bytes decide. A declared non-image type is refused before any decoding.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _UNSPECIFIED_TYPES:
        return None
    if not media.startswith("image/"):
        raise ImageError(
            "unsupported_media_type",
            f"Content-Type {media!r} is not an image type; send {_allowed_types_text()} "
            "or application/octet-stream",
            415,
        )
    return media


def _open(data: bytes, declared: str | None) -> Image.Image:
    """Read only the header, restricted to the allowed formats so no other plugin parses client bytes."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            "too_many_pixels", f"Pillow's decompression-bomb guard refused the image: {e}"
        ) from None
    except UnidentifiedImageError:
        other = sniff_unsupported(data)
        if other is not None:
            raise ImageError(
                "unsupported_media_type",
                f"{other} images are not supported; send one of {', '.join(ALLOWED_FORMATS)}",
                415,
            ) from None
        if declared is not None and declared not in IMAGE_MEDIA_TYPES:
            raise ImageError(
                "unsupported_media_type",
                f"{declared} is not supported; send one of {', '.join(ALLOWED_FORMATS)}",
                415,
            ) from None
        raise ImageError(
            "corrupt_image", f"the data is not a readable {'/'.join(ALLOWED_FORMATS)} image"
        ) from None
    except Exception as e:  # header parsers raise OSError, ValueError, EOFError... on hostile input
        logger.debug("image header rejected", exc_info=True)
        raise ImageError("corrupt_image", f"the image header could not be read: {e}") from None
    if img.format not in _ACCEPTED:  # cannot happen with `formats=` above; kept as a hard guarantee
        img.close()
        raise ImageError("unsupported_media_type", f"{img.format} images are not supported", 415)
    return img


def sniff_unsupported(data: bytes) -> str | None:
    """Name of a known but unsupported image format the bytes start with, else None."""
    for offset, magic, name in _OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(data[8:12])
    head = data[:1024].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3] in b" \t\r\n":
        return "PNM"
    return None


def _allowed_types_text() -> str:
    return ", ".join(sorted({f"image/{f.lower()}" for f in ALLOWED_FORMATS}))
