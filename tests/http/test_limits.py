"""HTTP-layer limits against a live `python -m service`, over raw sockets: what a hostile client
sends is refused by the protocol (service/http_server.py) before the app or the body is read."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import images
from tests.conftest import LiveServer, run_server

HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("limits"),
        cli=True,
        max_header_bytes=4096,
        max_header_count=20,
        max_request_line_bytes=1024,
        header_timeout_s=HEADER_TIMEOUT_S,
    ) as s:
        yield s


def connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one whole response (the server closes after each refusal, so read to EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def predict_head(extra: bytes = b"", target: bytes = b"/v1/predict", length: int | None = None) -> bytes:
    body = images.jpeg()
    n = len(body) if length is None else length
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        + extra + b"Content-Length: %d\r\n\r\n" % n
    )


def rejected(server: LiveServer, reason: str) -> float:
    return server.metrics().get(f'convserve_rejected_images_total{{protocol="http",reason="{reason}"}}', 0.0)


def assert_error(status: int, headers: dict[str, str], body: bytes, want: int, code: str) -> None:
    assert status == want, body
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        (b"X-Big: " + b"a" * 64 * 1024 + b"\r\n", "one 64 KiB header"),
        (b"".join(b"X-H%d: v\r\n" % i for i in range(1000)), "1,000 headers"),
        (b"".join(b"X-%d: %s\r\n" % (i, b"v" * 300) for i in range(15)), "15 headers of 300 bytes"),
    ],
)
def test_oversized_headers_get_431_before_the_body(server: LiveServer, extra: bytes, what: str) -> None:
    before = rejected(server, "headers_too_large")
    with connect(server) as sock:
        # The body is announced but never sent: a 431 proves the refusal came before it was read.
        sock.sendall(predict_head(extra, length=10_000_000))
        assert_error(*read_response(sock), 431, "headers_too_large")
        assert sock.recv(1) == b""  # and the connection is closed
    assert rejected(server, "headers_too_large") == before + 1, what
    assert server.client.get("/readyz").status_code == 200  # still serving


def test_huge_header_is_refused_while_still_arriving(server: LiveServer) -> None:
    """An 8 MiB header value is refused once the head passes the limit, not buffered to the end."""
    before = rejected(server, "headers_too_large")
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 8 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending: the reply may be lost with it
        else:
            assert_error(*read_response(sock), 431, "headers_too_large")
        # either way the server refused it as soon as the head passed the limit
    assert rejected(server, "headers_too_large") == before + 1
    assert server.client.get("/healthz").status_code == 200


def test_headers_just_inside_the_limits_are_served(server: LiveServer) -> None:
    extra = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 150) for i in range(15))  # ~2.4 KiB, 18 headers
    with connect(server) as sock:
        sock.sendall(predict_head(extra) + images.jpeg())
        status, _, body = read_response(sock)
    assert status == 200, body
    assert json.loads(body)["predictions"]


def test_long_request_line_gets_414(server: LiveServer) -> None:
    before = rejected(server, "request_line_too_long")
    with connect(server) as sock:
        sock.sendall(b"GET /healthz?q=" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_error(*read_response(sock), 414, "request_line_too_long")
    assert rejected(server, "request_line_too_long") == before + 1


def test_slow_loris_connections_are_closed_after_the_header_deadline(server: LiveServer) -> None:
    before = rejected(server, "header_timeout")
    stalled = [connect(server) for _ in range(20)]
    silent = connect(server)
    for sock in stalled:
        sock.sendall(b"POST /v1/predict HT")  # half a request line, then nothing
    start = time.monotonic()
    # a normal client is served meanwhile
    assert server.client.get("/readyz").status_code == 200
    for sock in stalled:
        assert_error(*read_response(sock), 408, "header_timeout")
        assert sock.recv(1) == b""
        sock.close()
    assert silent.recv(1) == b""  # connected and sent nothing: closed without a response
    silent.close()
    assert time.monotonic() - start >= HEADER_TIMEOUT_S * 0.9
    assert rejected(server, "header_timeout") == before + 20


def test_trickled_headers_still_hit_the_deadline(server: LiveServer) -> None:
    """A byte every 0.1 s never idles long, but the deadline covers the whole head."""
    with connect(server) as sock:
        start = time.monotonic()
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if select.select([sock], [], [], 0.1)[0]:  # the server answered
                break
            sock.sendall(bytes([b]))
        else:
            pytest.fail("the server was still reading headers after 20 s of trickle")
        assert_error(*read_response(sock), 408, "header_timeout")
        assert time.monotonic() - start >= HEADER_TIMEOUT_S * 0.9
