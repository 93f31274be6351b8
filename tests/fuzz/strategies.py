"""Inputs for the parser fuzzers: valid requests, and mutations of them (flips, cuts, splices)."""

from __future__ import annotations

import base64
import io

from hypothesis import strategies as st
from PIL import Image

from service.errors import ERROR_CODES, ImageError

SETTINGS = {"max_examples": 200, "deadline": None, "derandomize": True}


def image_bytes(fmt: str, size: tuple[int, int] = (12, 9), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 90) if mode == "RGB" else 128).save(buf, fmt)
    return buf.getvalue()


VALID_IMAGES = [
    image_bytes("JPEG"),
    image_bytes("PNG"),
    image_bytes("PNG", mode="L"),
    image_bytes("WEBP"),
    image_bytes("BMP"),
    image_bytes("GIF", mode="L"),
    image_bytes("TIFF"),
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid input, then a few random edits: byte flips, truncation, insertion, duplication."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "zero"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:
            end = min(len(data), at + draw(st.integers(1, 32)))
            data[at:end] = bytes(end - at)
    return bytes(data)


def any_bytes(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(seeds))


def b64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_documented(e: ImageError) -> None:
    assert e.code in ERROR_CODES, e
    assert e.status == ERROR_CODES[e.code].status or e.status in (400, 413, 415), e
    assert e.message
