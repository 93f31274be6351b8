"""Errors a client's image can cause, each with a stable code, an HTTP status and a meaning.

`ERROR_CODES` is the one table behind the JSON error bodies, the README/docs error table and the
`reason` label of `convserve_rejected_images_total`, so the three cannot disagree. Routes turn an
`ImageError` into `{"error": {"code", "message", "index"?}}` at the edge; nothing here knows HTTP
beyond the status number.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple


class ErrorCode(NamedTuple):
    status: int
    meaning: str


ERROR_CODES: Final[dict[str, ErrorCode]] = {
    "empty_body": ErrorCode(
        400, "The request body is empty: send the image bytes, a multipart file or JSON."
    ),
    "corrupt_image": ErrorCode(
        400, "The image data is empty, truncated or corrupt, or is not an image at all; it cannot be decoded."
    ),
    "unsupported_media_type": ErrorCode(
        415,
        "The image format is not JPEG, PNG, WEBP, BMP, GIF or TIFF, or the declared Content-Type is not "
        "an image type.",
    ),
    "too_many_pixels": ErrorCode(
        413, "Width x height exceeds the pixel limit (CONVSERVE_MAX_IMAGE_PIXELS or Pillow's bomb guard)."
    ),
    "payload_too_large": ErrorCode(413, "The upload exceeds CONVSERVE_MAX_UPLOAD_BYTES."),
    "missing_file": ErrorCode(400, "A multipart request carries no file part."),
    "bad_base64": ErrorCode(400, "An entry of the JSON `images` list is not valid base64."),
    "bad_request": ErrorCode(400, "The request is malformed in some other way; the message says how."),
}


class ImageError(Exception):
    """A client-caused failure with one image (or its request). Never a server fault.

    `status` defaults to the table's status for `code`, so `ImageError("too_many_pixels", msg)` is
    a 413 without the caller repeating it; unknown codes fall back to 400. `index` is set by the
    route for multi-image requests so the client can tell which image failed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        index: int | None = None,
        images: int = 1,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else status_for(code)
        self.index = index
        self.images = images  # images the request loses (convserve_rejected_images_total counts each)

    def with_index(self, index: int) -> ImageError:
        """A copy that names the position of the failing image in a multi-image request."""
        return ImageError(self.code, self.message, self.status, index=index)

    def to_dict(self) -> dict[str, Any]:
        """The body of the `error` object in the JSON answer."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.index is not None:
            body["index"] = self.index
        return body

    def __repr__(self) -> str:
        return f"ImageError({self.code!r}, {self.message!r}, status={self.status}, index={self.index})"


def status_for(code: str) -> int:
    entry = ERROR_CODES.get(code)
    return entry.status if entry is not None else 400


def error_table_markdown() -> str:
    """The code -> status -> meaning table as Markdown, for docs (a test keeps docs/images.md equal)."""
    rows = ["| Code | HTTP status | Meaning |", "|---|---|---|"]
    rows += [f"| `{code}` | {e.status} | {e.meaning} |" for code, e in ERROR_CODES.items()]
    return "\n".join(rows)
