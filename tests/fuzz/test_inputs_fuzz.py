"""Property tests of the request envelope parsers (service/inputs.py): raw body, multipart and
base64 JSON, on random bytes and on mutations of valid requests. The only allowed failure is an
`ImageError` with a documented code, raised for the request or returned per entry."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ImageError
from service.inputs import Parsed, Upload, parse_body
from tests.fuzz.strategies import SETTINGS, VALID_IMAGES, any_bytes, assert_documented, b64_of, mutated

MAX_IMAGES = 8
BOUNDARY = "fuzzBoundary7MA4YWxk"


def multipart(files: list[bytes], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for i, data in enumerate(files):
        out += (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f{i}.png\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode() + data + b"\r\n"
    out += b"--" + boundary.encode() + b"--\r\n"
    return out


VALID_MULTIPART = [multipart(VALID_IMAGES[:1]), multipart(VALID_IMAGES[:3]), multipart([b"", b"x"])]
VALID_JSON = [
    json.dumps({"images": [b64_of(VALID_IMAGES[0])]}).encode(),
    json.dumps({"images": [b64_of(d) for d in VALID_IMAGES[:3]]}).encode(),
    json.dumps({"images": ["data:image/png;base64," + b64_of(VALID_IMAGES[1])]}).encode(),
]
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "",
        "image/png",
        "application/octet-stream",
        "application/json",
        "application/ld+json",
        f"multipart/form-data; boundary={BOUNDARY}",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary="a b"',
        "text/plain; charset=utf-8",
    ]
)


def check(body: bytes, content_type: str | None) -> Parsed | None:
    try:
        parsed = parse_body(body, content_type, MAX_IMAGES)
    except ImageError as e:
        assert_documented(e)
        return None
    assert isinstance(parsed, Parsed)
    assert 1 <= len(parsed.entries) <= MAX_IMAGES
    assert parsed.single == (len(parsed.entries) == 1)
    for i, entry in enumerate(parsed.entries):
        if isinstance(entry, ImageError):
            assert_documented(entry)
            assert entry.index == i
        else:
            assert isinstance(entry, Upload) and isinstance(entry.data, bytes)
    return parsed


@settings(**SETTINGS)
@given(body=any_bytes(VALID_IMAGES + VALID_MULTIPART + VALID_JSON), content_type=CONTENT_TYPES)
def test_any_body_under_any_content_type(body: bytes, content_type: str | None) -> None:
    check(body, content_type)


@settings(**SETTINGS)
@given(body=mutated(VALID_MULTIPART))
def test_mutated_multipart(body: bytes) -> None:
    check(body, f"multipart/form-data; boundary={BOUNDARY}")


@settings(**SETTINGS)
@given(body=mutated(VALID_JSON))
def test_mutated_json(body: bytes) -> None:
    check(body, "application/json")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(**SETTINGS)
@given(images=st.lists(st.one_of(JSON_VALUES, st.text(max_size=80), st.just(b64_of(VALID_IMAGES[0])))))
def test_json_documents_of_any_shape(images: list[object]) -> None:
    parsed = check(json.dumps({"images": images}).encode(), "application/json")
    if parsed is not None:  # entries stay in order, one per list item
        assert len(parsed.entries) == len(images)


@settings(**SETTINGS)
@given(files=st.lists(st.sampled_from(VALID_IMAGES), min_size=1, max_size=MAX_IMAGES))
def test_valid_multipart_round_trips(files: list[bytes]) -> None:
    parsed = check(multipart(files), f"multipart/form-data; boundary={BOUNDARY}")
    assert parsed is not None
    assert [e.data for e in parsed.entries if isinstance(e, Upload)] == files


@settings(**SETTINGS)
@given(count=st.integers(MAX_IMAGES + 1, 3 * MAX_IMAGES))
def test_too_many_images_is_a_documented_400(count: int) -> None:
    body = json.dumps({"images": [b64_of(VALID_IMAGES[0])] * count}).encode()
    try:
        parse_body(body, "application/json", MAX_IMAGES)
    except ImageError as e:
        assert_documented(e)
        assert e.status == 400
    else:
        raise AssertionError("more images than the limit were accepted")
