"""Request body -> the image byte strings it carries: raw body, multipart files, or JSON base64.

No decoding here (that is service/decode.py, in the thread pool); only the envelope. Errors about the
whole request raise `ImageError`; a bad entry in a multi-image request becomes that entry's own
`ImageError` so its neighbours still get predictions.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ImageError
from service.http_errors import ServiceError


@dataclass(slots=True)
class Upload:
    data: bytes
    content_type: str | None  # declared type (raw body or multipart part), None for base64


Entry = Upload | ImageError  # one per image, in input order


@dataclass(slots=True)
class Parsed:
    entries: list[Entry]
    single: bool  # answer with the one-image shape (predictions) rather than results


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 before reading a byte when the client announces too much."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise ImageError(
            "payload_too_large", f"the body is {content_length} bytes; the limit is {limit} bytes", 413
        )


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Read the body, failing as soon as it passes `limit` (chunked uploads carry no Content-Length)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ImageError("payload_too_large", f"the body exceeds the limit of {limit} bytes", 413)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of an upload route: 413 before reading when the announced length is over
    `limit`, 413 as soon as a chunked body passes it, 499 `client_disconnected` (a rejection the
    error handler counts) when the client goes away mid-body."""
    check_declared_length(request.headers.get("content-length"), limit)
    try:
        return await read_limited(request.stream(), limit)
    except ClientDisconnect:
        raise ServiceError("client_disconnected", "the client went away", 499) from None


def parse_body(body: bytes, content_type: str | None, max_images: int) -> Parsed:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        entries: list[Entry] = list(parse_multipart(body, content_type or ""))
        if not entries:
            raise ImageError("missing_file", "the multipart body has no file part; send the image as a file")
    elif media == "application/json" or media.endswith("+json"):
        entries = parse_json(body)
    else:
        if not body:
            raise ImageError("empty_body", "the request body is empty; send the image bytes")
        return Parsed([Upload(body, content_type)], single=True)
    if len(entries) > max_images:
        raise ImageError(
            "bad_request",
            f"{len(entries)} images in one request; the limit is {max_images}",
            400,
            images=len(entries),  # every refused image is counted, not one per request
        )
    return Parsed(entries, single=len(entries) == 1)


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """Every part with a filename is an image, in order; other form fields are ignored."""
    if not body:
        raise ImageError("empty_body", "the request body is empty; send a multipart file part")
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ImageError("bad_request", "multipart/form-data without a boundary parameter", 400)
    files: list[Upload] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    data: list[bytes] = []
    finished = False

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        field.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        value.extend(buf[start:end])

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.append(buf[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        filename = disposition.get(b"filename", disposition.get(b"filename*"))
        content = b"".join(data)
        if filename is None or (not filename and not content):
            return  # a plain form field, or a browser's "no file chosen" part
        part_type = headers.get(b"content-type")
        files.append(Upload(content, part_type.decode("latin-1") if part_type else None))

    def on_end() -> None:
        nonlocal finished
        finished = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise ImageError("bad_request", f"the multipart body cannot be parsed: {e}", 400) from None
    if not finished:
        raise ImageError("bad_request", "the multipart body is incomplete (no closing boundary)", 400)
    return files


def parse_json(body: bytes) -> list[Entry]:
    if not body:
        raise ImageError("empty_body", 'the request body is empty; send {"images": ["<base64>", ...]}')
    try:
        doc = json.loads(body)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integers; RecursionError
    # is a deeply nested document ("[[[[..."): all the client's doing, never a 500.
    except (ValueError, RecursionError) as e:
        raise ImageError("bad_request", f"the body is not valid JSON: {str(e)[:200]}", 400) from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images:
        raise ImageError(
            "bad_request", 'the JSON body must be {"images": ["<base64>", ...]} with 1+ images', 400
        )
    return [_b64_entry(item, i) for i, item in enumerate(images)]


def _b64_entry(item: object, index: int) -> Entry:
    if not isinstance(item, str):
        return ImageError(
            "bad_base64", f"images[{index}] is a {type(item).__name__}, not a base64 string", index=index
        )
    text = item
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        _, _, text = text.partition(",")
    try:
        return Upload(base64.b64decode(text, validate=True), None)
    except (binascii.Error, ValueError):
        pass
    try:  # `base64` without -w0 wraps lines; whitespace is the only leniency
        return Upload(base64.b64decode("".join(text.split()), validate=True), None)
    except (binascii.Error, ValueError) as e:
        return ImageError("bad_base64", f"images[{index}] is not valid base64: {e}", index=index)
