"""Test images of every kind, made in memory (no fixtures on disk, no downloads).

Most images show four coloured quadrants (`QUADRANTS`), so a test can check where each colour ends
up after EXIF orientation or channel conversion. Sizes are multiples of 16 so JPEG's 8x8 blocks and
2x2 chroma subsampling keep each quadrant's colour clean away from the borders. Every function
returns the encoded file's bytes, except `quadrant_image` and `photo_image` (PIL images).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
# Upright layout: top-left, top-right, bottom-left, bottom-right.
QUADRANTS: dict[str, RGB] = {
    "top_left": (255, 0, 0),
    "top_right": (0, 255, 0),
    "bottom_left": (0, 0, 255),
    "bottom_right": (255, 255, 0),
}
# The stored (pre-rotation) image for each EXIF orientation is the upright image with the inverse
# of the display transform applied (EXIF 2.3, tag 0x0112): 6 = "rotate 90 clockwise to view".
_STORED_TRANSPOSE = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # Pillow's ROTATE_90 is counter-clockwise: undoes a clockwise turn
    8: Image.Transpose.ROTATE_270,
}


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def quadrant_image(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """RGB image, upright, with the four `QUADRANTS` colours. Landscape by default (w > h)."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = QUADRANTS["top_left"]
    arr[: h // 2, w // 2 :] = QUADRANTS["top_right"]
    arr[h // 2 :, : w // 2] = QUADRANTS["bottom_left"]
    arr[h // 2 :, w // 2 :] = QUADRANTS["bottom_right"]
    return Image.fromarray(arr, "RGB")


def jpeg(size: tuple[int, int] = (96, 64), orientation: int | None = None, quality: int = 95) -> bytes:
    """Quadrant JPEG whose *displayed* image (after applying `orientation`) is `quadrant_image(size)`."""
    upright = quadrant_image(size)
    if orientation is None:
        return encode(upright, "JPEG", quality=quality)
    method = _STORED_TRANSPOSE[orientation]
    stored = upright.transpose(method) if method is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=quality, exif=exif.tobytes())


def png(mode: str, size: tuple[int, int] = (96, 64)) -> bytes:
    """Quadrant PNG in `mode`: 1, L, LA, P, RGB, RGBA or I;16 (LA/RGBA: left half transparent).
    Greyscale modes hold the quadrants' luma (ITU-R 601: 76, 150, 29, 226), 1 thresholds it at 128."""
    img = quadrant_image(size)
    w, _ = size
    if mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        alpha = np.full((size[1], w), 255, dtype=np.uint8)
        alpha[:, : w // 2] = 0  # left half fully transparent: must come out as alpha_background
        rgba.putalpha(Image.fromarray(alpha, "L"))
        return encode(rgba.convert(mode), "PNG")
    if mode == "I;16":
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range, same levels
        return encode(Image.fromarray(grey), "PNG")  # Pillow picks I;16 for uint16 arrays
    if mode == "P":
        return encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG")
    if mode == "1":  # threshold, not dither: quadrants become black (red, blue) and white (green, yellow)
        return encode(img.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1"), "PNG")
    return encode(img.convert(mode), "PNG")


def png_palette_transparent(size: tuple[int, int] = (96, 64)) -> bytes:
    """Palette PNG (tRNS chunk) whose top-left (red) quadrant is the transparent index."""
    pal = quadrant_image(size).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    red_index = pal.getpixel((0, 0))
    return encode(pal, "PNG", transparency=red_index)


def png_rgb_colour_key(size: tuple[int, int] = (96, 64)) -> bytes:
    """RGB PNG with a tRNS colour key: every red pixel (the top-left quadrant) is transparent."""
    return encode(quadrant_image(size), "PNG", transparency=QUADRANTS["top_left"])


def tiff_float(size: tuple[int, int] = (96, 64)) -> bytes:
    """32-bit float ('F') TIFF in 0..1: the quadrants' grey levels / 255."""
    grey = np.asarray(quadrant_image(size).convert("L"), dtype=np.float32) / 255.0
    return encode(Image.fromarray(grey, "F"), "TIFF")


def tiff_lab(size: tuple[int, int] = (96, 64)) -> bytes:
    """CIELAB TIFF (as some prepress tools write), converted from the quadrant image via LittleCMS."""
    from PIL import ImageCms

    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    lab = ImageCms.applyTransform(quadrant_image(size), to_lab)
    assert lab is not None
    return encode(lab, "TIFF")


def cmyk_jpeg(size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(quadrant_image(size).convert("CMYK"), "JPEG", quality=95)


def animated_gif(colours: tuple[RGB, ...] = ((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> bytes:
    """One solid colour per frame; the first frame's colour is what a decoder must return."""
    frames = [Image.new("RGB", (64, 48), c) for c in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def animated_webp(colours: tuple[RGB, ...] = ((255, 0, 0), (0, 255, 0))) -> bytes:
    frames = [Image.new("RGB", (64, 48), c) for c in colours]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)


def mpo(size: tuple[int, int] = (96, 64)) -> bytes:
    """A multi-picture JPEG (as cameras write with an embedded preview): Pillow reports format MPO."""
    frames = [quadrant_image(size), Image.new("RGB", size, (0, 0, 0))]
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)


def webp(size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(quadrant_image(size), "WEBP", lossless=True)


def bmp(size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(quadrant_image(size), "BMP")


def tiff(size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(quadrant_image(size), "TIFF")


def gif(size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(quadrant_image(size), "GIF")


def ico(size: tuple[int, int] = (64, 64)) -> bytes:
    """A real image format Pillow can read but the service does not accept (415)."""
    return encode(quadrant_image(size), "ICO")


def heic_header() -> bytes:
    """The first box of a HEIC file (what iPhones send): enough to be recognised, not to be decoded."""
    return struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic" + bytes(64)


def truncated_jpeg(size: tuple[int, int] = (256, 192), keep: float = 0.5) -> bytes:
    data = photo_jpeg(size)
    return data[: int(len(data) * keep)]


def truncated_png(size: tuple[int, int] = (256, 192), keep: float = 0.5) -> bytes:
    data = encode(photo_image(size), "PNG")
    return data[: int(len(data) * keep)]


def garbage(n: int = 4096, seed: int = 0) -> bytes:
    """Random bytes. The first byte is fixed so no format's magic can match by chance."""
    return b"\x5a" + np.random.default_rng(seed).integers(0, 256, n - 1, dtype=np.uint8).tobytes()


def empty() -> bytes:
    return b""


def text_file() -> bytes:
    return b"This is not an image.\nIt is a plain text file that a client uploaded by mistake.\n"


@cache
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height (400 Mpx by default) that compresses to ~0.1 MB.

    Written chunk by chunk: making it with Pillow would need the full-size image in memory, which
    is exactly what the decompression-bomb guard exists to prevent.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits, all black
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def photo_image(size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    """Photo-like RGB content: smooth gradients, hard-edged shapes and fine noise, so that scaling
    differences (reduced-scale decode vs full decode) show up as they would on real photos."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:h, 0:w]
    xf, yf = x.astype(np.float32) / w, y.astype(np.float32) / h
    arr = np.empty((h, w, 3), dtype=np.float32)
    arr[..., 0] = 127 + 100 * np.sin(xf * 6.0) * np.cos(yf * 4.0)
    arr[..., 1] = 127 + 100 * np.cos((x + y).astype(np.float32) / (w + h) * 9.0)
    arr[..., 2] = xf * 200 + 30
    for _ in range(12):  # solid discs: hard edges at arbitrary positions
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.15) * min(w, h)
        x0, x1, y0, y1 = (
            int(max(0, cx - r)),
            int(min(w, cx + r + 1)),
            int(max(0, cy - r)),
            int(min(h, cy + r + 1)),
        )
        disc = (x[:, x0:x1] - cx) ** 2 + (y[y0:y1] - cy) ** 2 < r * r
        arr[y0:y1, x0:x1][disc] = rng.integers(0, 256, 3)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * 6  # sensor-like grain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@cache
def photo_jpeg(size: tuple[int, int] = (640, 480), seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo_image(size, seed), "JPEG", quality=quality)
