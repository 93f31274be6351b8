"""The HTTP layer under the app: header limits, a slow-loris deadline, and a drain that loses nothing.

uvicorn's httptools protocol sets no header limits and knows nothing of a drain: a request whose
bytes sit unread on a kept-alive socket is invisible to the app, responses during a drain do not say
`Connection: close`, and uvicorn closes idle connections at shutdown even while a client is about to
reuse one. `ConvserveHttpProtocol` subclasses it (so httptools' C parser still does the parsing) and
adds, per connection:

- limits (`HttpLimits`): request line -> 414, header bytes or count -> 431, headers not complete
  within the deadline -> 408 (or a silent close when nothing was sent), all answered with the
  service's JSON error and counted in `convserve_rejected_images_total` before the app sees anything;
- an answer that starts before the request body is read whole (e.g. 413 while streaming) says
  `Connection: close`, then the connection lingers (`LINGER_S`, the rest of the body dropped
  unparsed) and closes. uvicorn's protocol would keep it open and parse and drop whatever the client
  kept sending, without bound (measured: 5 GB in 8 s on one connection after a 413);
- drain state: how many requests it has begun (first byte parsed) and answered, and when it last
  saw activity. From `begin_drain()` on every response carries `Connection: close`, and `drain()`
  closes a connection only when it holds no unanswered request and has been quiet `DRAIN_IDLE_S`
  (a client in a closed loop sends its next request well within that, gets `Connection: close` and
  reconnects, so nothing is closed under a request).

uvicorn builds protocols from a class, so the app factory (limits, metrics), the protocol instances
and `DrainingServer` (the listeners) meet in one module-level `HttpLayer`: one server per process,
as the service is designed (scale with replicas).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)
DRAIN_IDLE_S = 0.5  # a connection quiet this long during a drain is between requests: close it
# An answer sent before the request body was read whole (413 while streaming, 413 by Content-Length,
# any early error) closes the connection; for this long after it the rest of the body is read and
# dropped unparsed (a "lingering close", as nginx does), so that closing does not reset the
# connection under a client still sending, which would lose the answer it has not read yet.
LINGER_S = 2.0
_SWEEP_S = 0.02


# What this layer refuses, counted as convserve_rejected_images_total{reason, protocol="http"}.
HTTP_LAYER_REASONS = ("headers_too_large", "request_line_too_long", "header_timeout")


@dataclass(frozen=True)
class HttpLimits:
    max_request_line_bytes: int = 8 * 1024
    max_header_bytes: int = 16 * 1024
    max_header_count: int = 100
    header_timeout_s: float = 10.0


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HttpLayer:
    """What the protocols, the server and the app's SIGTERM drain share (one per process)."""

    def __init__(self) -> None:
        self.limits = HttpLimits()
        self.on_reject: Callable[[str], None] = lambda reason: None
        self.connections: set[ConvserveHttpProtocol] = set()
        self.draining = False
        self.active = False  # a ConvserveHttpProtocol was built: the drain below applies
        self.servers: list[asyncio.AbstractServer] = []  # set by DrainingServer

    def configure(self, limits: HttpLimits, on_reject: Callable[[str], None]) -> None:
        self.limits, self.on_reject = limits, on_reject

    def begin_drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.begin_drain()

    def sweep(self, now: float) -> int:
        """Close connections that are between requests; return how many may still get one."""
        pending = 0
        for conn in list(self.connections):
            if conn.unanswered or now - conn.last_activity < DRAIN_IDLE_S:
                pending += 1
            else:
                conn.close_idle()
        return pending

    async def drain(self, delay_s: float, grace_s: float, app_busy: Callable[[], bool]) -> bool:
        """Serve with `Connection: close` for `delay_s`, close the listeners, then wait until no
        connection can still get a request and the app is idle, or `grace_s` passes. True if settled."""
        loop = asyncio.get_running_loop()
        self.begin_drain()
        end_delay = loop.time() + delay_s
        while loop.time() < end_delay:
            self.sweep(loop.time())
            await asyncio.sleep(_SWEEP_S)
        await self.close_listeners()
        deadline = loop.time() + grace_s
        while loop.time() < deadline:
            if not self.sweep(loop.time()) and not app_busy():
                return True
            await asyncio.sleep(_SWEEP_S)
        return False

    async def close_listeners(self) -> None:
        """Stop taking connections so a late client is refused at connect, never reset: first drop
        new handshakes (a socket filter on the listener), let the loop accept what the kernel has
        already queued, then close. Closing at once would reset the queued ones."""
        if not self.servers:
            return
        for server in self.servers:
            for sock in getattr(server, "sockets", ()) or ():
                _drop_new_handshakes(sock)
        await asyncio.sleep(0.05)
        for server in self.servers:
            server.close()


LAYER = HttpLayer()


def _drop_new_handshakes(sock: Any) -> None:
    """Attach a classic-BPF "drop everything" filter (Linux): SYNs to the listener are dropped, so
    the client retries its SYN and then finds the port closed (refused), while connections already
    in the accept queue are untouched. Best effort: elsewhere the listener just closes."""
    try:
        insn = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K 0
        prog = struct.pack("HL", 1, ctypes.addressof(insn))
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_ATTACH_FILTER", 26), prog)
    except (OSError, AttributeError) as e:
        log.debug("cannot filter the listener (%s): closing it directly", e)


class ConvserveHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus limits and drain state (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        LAYER.active = True
        self.limits = LAYER.limits
        self.begun = 0  # requests whose first byte was parsed
        self.answered = 0  # responses completed
        self.last_activity = self.loop.time()
        self._in_head = False  # between a request's first byte and its headers' end
        self._head_raw = 0  # bytes fed while in the head (bounds httptools' own buffering)
        self._line = 0
        self._header_bytes = 0
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # answered with the body unread: dropping the rest until closed

    @property
    def unanswered(self) -> int:
        return 0 if self.transport is None or self.transport.is_closing() else self.begun - self.answered

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        LAYER.connections.add(self)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        LAYER.connections.discard(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing() or self._lingering:  # lingering: the rest of a refused body
            return
        self.last_activity = self.loop.time()
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as e:
            refused = e.__context__ if isinstance(e.__context__, _Refused) else None
            if refused is not None:
                self._refuse(refused)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        limit = self.limits.max_request_line_bytes + self.limits.max_header_bytes
        if self._in_head and self._head_raw > limit:  # one huge header still being buffered
            self._refuse(_Refused(431, "headers_too_large", f"the request head exceeds {limit} bytes"))

    # Parser callbacks: count, then hand over to uvicorn's.
    def on_message_begin(self) -> None:
        self.begun += 1
        self._in_head = True
        self._head_raw = self._line = self._header_bytes = self._header_count = 0
        if self._head_timer is None:
            self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._line += len(url)
        if self._line > self.limits.max_request_line_bytes:
            limit = self.limits.max_request_line_bytes
            raise _Refused(414, "request_line_too_long", f"the request target exceeds {limit} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            raise _Refused(431, "headers_too_large", f"more than {self.limits.max_header_count} headers")
        if self._header_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            raise _Refused(431, "headers_too_large", f"the headers exceed {limit} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()
        if self.cycle is not None:
            self._close_if_answered_early(self.cycle)
        if LAYER.draining and self.cycle is not None and not self.pipeline:
            self.cycle.keep_alive = False  # the response says Connection: close; the client moves on

    def on_response_complete(self) -> None:
        self.answered += 1
        self.last_activity = self.loop.time()
        super().on_response_complete()

    # Answers that come before the body
    def _close_if_answered_early(self, cycle: Any) -> None:
        """Wrap the cycle's ASGI send: a response that starts while the request body is still
        arriving says `Connection: close` and, once written, ends in a lingering close."""
        send = cycle.send

        async def guarded(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body and not cycle.disconnected:
                cycle.keep_alive = False  # uvicorn adds the header and closes after the body...
                cycle.transport = _LingeringClose(self)  # ... through this, which lingers first
            await send(message)

        cycle.send = guarded

    def linger_then_close(self) -> None:
        """Send FIN after the answer, drop what still arrives, close at LINGER_S (or at the
        client's own close, which asyncio reports as EOF and closes the transport for)."""
        if self._lingering or self.transport.is_closing():
            return
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.close_idle)

    # Drain
    def begin_drain(self) -> None:
        cycle = self.pipeline[0][0] if self.pipeline else self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # closes after this response (with the header if not yet sent)

    def close_idle(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # Limits
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head:  # a slow client (or slow-loris): 408, then close
            self._refuse(_Refused(408, "header_timeout", "the request headers did not arrive in time"))
        elif self.cycle is None:  # connected and sent nothing
            self.transport.close()

    def _refuse(self, refused: _Refused) -> None:
        self._cancel_head_timer()
        body = json.dumps({"error": {"code": refused.code, "message": refused.message}}).encode()
        head = [STATUS_LINE[refused.status]]
        head += [b"%s: %s\r\n" % (n, v) for n, v in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
        self.answered = self.begun
        LAYER.on_reject(refused.code)
        self.logger.info("refused a request: %d %s", refused.status, refused.message)


class _LingeringClose:
    """The connection's transport as the cycle sees it, except that close() lingers first."""

    def __init__(self, protocol: ConvserveHttpProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def close(self) -> None:
        self._protocol.linger_then_close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that hands its listeners to the layer, so the drain can close them itself
    (after the drain delay) instead of at shutdown."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        LAYER.servers = list(getattr(self, "servers", []))
