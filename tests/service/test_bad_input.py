"""Every bad-image and bad-envelope case, each followed by a good request that must still succeed."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from tests import images
from tests.conftest import LiveServer
from tests.service.helpers import MAX_UPLOAD, read_http_response, rejected

BAD_CASES = [
    ("empty body", b"", "image/jpeg", 400, "empty_body"),
    ("truncated jpeg", images.truncated_jpeg(), "image/jpeg", 400, "corrupt_image"),
    ("garbage", images.garbage(), "application/octet-stream", 400, "corrupt_image"),
    ("text declared as text", images.text_file(), "text/plain", 415, "unsupported_media_type"),
    ("heic", images.heic_header(), "image/heic", 415, "unsupported_media_type"),
    ("ico", images.ico(), "image/x-icon", 415, "unsupported_media_type"),
    ("too many pixels", images.bomb_png(1100, 1000), "image/png", 413, "too_many_pixels"),
    ("decompression bomb", images.bomb_png(), "image/png", 413, "too_many_pixels"),
]


@pytest.mark.parametrize(
    ("case", "data", "ctype", "status", "code"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_bad_image_then_good_request(
    server: LiveServer, case: str, data: bytes, ctype: str, status: int, code: str
) -> None:
    before = rejected(server, code)
    r = server.client.post(
        "/v1/predict", content=data, headers={"Content-Type": ctype, "X-Request-ID": f"t-{code}"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert "index" not in err
    assert r.headers["x-request-id"] == f"t-{code}" == err["request_id"]  # echoed
    assert rejected(server, code) == before + 1
    good = server.client.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
    assert good.status_code == 200


def test_upload_over_limit_by_content_length(server: LiveServer) -> None:
    r = server.client.post(
        "/v1/predict", content=b"\xff" * (MAX_UPLOAD + 1), headers={"Content-Type": "image/jpeg"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_upload_over_limit_while_streaming(server: LiveServer) -> None:
    """A chunked body has no Content-Length: the limit is enforced while reading, and the client
    gets its 413 while the body is still coming (it never sends the terminating chunk here).

    Raw socket, so nothing can pass on a transport error: the client stops right after the byte
    that crosses the limit and must read a whole 413 answer. (This server is bare uvicorn; the
    close that follows under `python -m service` is tests/service/test_early_answer.py's.)"""
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = 16384
    sizes = [chunk] * (MAX_UPLOAD // chunk) + [MAX_UPLOAD % chunk + 1]  # limit + 1 byte in all
    assert sum(sizes) == MAX_UPLOAD + 1
    before = rejected(server, "payload_too_large")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        for n in sizes:
            sock.sendall(b"%x\r\n" % n + b"\0" * n + b"\r\n")
        status, _, body = read_http_response(sock)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert rejected(server, "payload_too_large") == before + 1
    assert server.client.post("/v1/predict", content=images.jpeg()).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"data": {"field": "no file here"}, "files": {}}, "missing_file"),
        ({"json": {"images": ["not base64 ***"]}}, "bad_base64"),
        ({"json": {"pictures": []}}, "bad_request"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "bad_request"),
        # nesting deep enough to exhaust the JSON parser's recursion: still the client's fault
        ({"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}, "bad_request"),
        ({"content": b'{"images": ' + b"9" * 5000 + b"}", "headers": {"Content-Type": "application/json"}},
         "bad_request"),
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            "bad_request",
        ),
    ],
)
def test_bad_envelopes(server: LiveServer, kwargs: dict[str, object], code: str) -> None:
    if "files" in kwargs and not kwargs["files"]:  # httpx sends urlencoded without files: force multipart
        kwargs = {
            "content": b'--b\r\nContent-Disposition: form-data; name="field"\r\n\r\nx\r\n--b--\r\n',
            "headers": {"Content-Type": "multipart/form-data; boundary=b"},
        }
    r = server.client.post("/v1/predict", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code


def test_per_item_errors_in_a_multi_image_request(server: LiveServer) -> None:
    before = rejected(server, "corrupt_image")
    files = [
        ("file", ("good.jpg", images.jpeg(), "image/jpeg")),
        ("file", ("bad.jpg", images.truncated_jpeg(), "image/jpeg")),
        ("file", ("svg.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")),
        ("file", ("good.png", images.png("P"), "image/png")),
    ]
    r = server.client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert "predictions" in results[0] and "predictions" in results[3]
    assert results[1]["error"] == {
        "code": "corrupt_image",
        "message": results[1]["error"]["message"],
        "index": 1,
    }
    assert results[2]["error"]["code"] == "unsupported_media_type" and results[2]["error"]["index"] == 2
    assert rejected(server, "corrupt_image") == before + 1
    b64 = server.client.post(
        "/v1/predict", json={"images": [base64.b64encode(images.jpeg()).decode(), 7, "%%"]}
    )
    codes = [x.get("error", {}).get("code") for x in b64.json()["results"]]
    assert codes == [None, "bad_base64", "bad_base64"]
