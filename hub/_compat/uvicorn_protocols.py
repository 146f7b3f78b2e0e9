"""uvicorn's HTTP and WebSocket protocols with bounds on what a client may make hub hold.

``hub serve`` runs uvicorn with httptools, which has no header size limit at all (a 100 MB
header was read, parsed and answered with 200), no deadline for a request to arrive (an
idle TCP connection or a slowloris header stream is held forever) and, like every asyncio
server, a ``close()`` that waits for a peer that does not read. :class:`HubHttpProtocol`
and :class:`HubWebSocketProtocol` are uvicorn's own protocols with those holes closed; one
seam, :func:`protocol_classes`, hands them to ``uvicorn.Config``:

- the request line and headers are counted as the bytes arrive, before httptools buffers
  them: over ``max_header_bytes`` in total, one line over 8 KiB (the WebSocket parser's own
  limit) or more than ``max_headers`` headers → **431** at once; a declared or streamed body
  over the body limit → **413** at once;
- a request must be complete (headers and body) ``handshake_timeout_s`` after the
  connection opened or the previous response ended → **408**; a client that leaves its
  responses unread that long once the write buffer is full is aborted;
- connections still waiting for their first complete request are capped on the instance
  and per client address → **503** at once (configured proxies are exempt from the per-address cap);
- every refusal is answered, the write side shut (so the client reads the answer instead
  of a reset), what the client still sends is discarded, and the socket is aborted after
  ``close_timeout_s``;
- every close (keepalive ping timeout, 4008, any close) aborts after ``close_timeout_s``
  when the peer does not take what is buffered (hub.closing), and a WebSocket close never
  waits for a write buffer that a peer which does not read will never drain.

The TCP peer's address is left in the scope under :data:`PEER_KEY` (uvicorn's proxy-header
handling rewrites ``client``), for the trusted-proxy check of hub.auth.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
import weakref
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from hub._compat.lean import LeanFlag, LeanInbox
from hub.auth import PEER_KEY  # the TCP peer's address, in every HTTP and WebSocket scope
from hub.closing import ClosingTransport, closing_transport
from hub.config import Settings
from hub.logs import RateLimitedLog

log = logging.getLogger("hub.http")

# One request or header line: the WebSocket handshake parser (websockets) refuses longer
# ones itself, so refuse them here, where the refusal is actually sent.
MAX_LINE_BYTES = 8192 - 2


class _Refused(Exception):
    """Raised inside an httptools callback to stop the parser; the reason is stored."""


@dataclass
class Limits:
    """The bounds of one server, shared by all its connections."""

    max_header_bytes: int
    max_headers: int
    max_body_bytes: int
    handshake_timeout_s: float
    close_timeout_s: float
    max_pending: int
    max_pending_per_address: int
    max_pending_ceiling: int
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def is_exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.exempt)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Never let not-yet-authenticated connections take more than half of the
        # descriptors: health checks and real clients keep the rest.
        ceiling = max(1, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 20
        max_pending = max(1, min(settings.max_pending_connections, ceiling))
        # Exempt from the per-address cap: the configured proxies ("*" stays capped).
        exempt = tuple(ipaddress.ip_network(p, strict=False)
                       for p in settings.trusted_proxies if p != "*")
        return cls(settings.max_header_bytes, settings.max_headers, settings.body_limit,
                   settings.handshake_timeout_s, settings.close_timeout_s, max_pending,
                   settings.max_pending_per_address, ceiling, exempt)


class PendingConnections:
    """Connections that have not yet delivered a complete first request, oldest first.

    No legitimate connection is refused for being one of many: thousands of clients
    reconnecting at once, all from one load balancer's address, each complete their request
    within moments. So the caps pick whom to drop, never the newcomer:

    - over the per-address cap, that address's oldest waiting connection is dropped (503)
      once it has waited ``grace_s`` (half the request deadline); a younger one stays;
    - over the instance cap, the oldest waiting connection is dropped once it has waited
      ``grace_s``, and at once when the hard ceiling (half the descriptor limit) is hit.

    A flood of idle sockets therefore holds at most the ceiling's descriptors, each for at
    most ``grace_s`` once the caps are reached, and cannot lock out a health check or a
    real client, which completes its request in milliseconds."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # insertion-ordered, oldest first: connection -> (address, when it arrived)
        self._waiting: dict[HubHttpProtocol, tuple[str, float]] = {}
        self.by_address: Counter[str] = Counter()
        self.evicted = 0

    @property
    def total(self) -> int:
        return len(self._waiting)

    @property
    def grace_s(self) -> float:
        return self.limits.handshake_timeout_s / 2

    def acquire(self, conn: HubHttpProtocol, address: str) -> None:
        limits = self.limits
        now = time.monotonic()
        if (self.by_address[address] >= limits.max_pending_per_address
                and not limits.is_exempt(address)):
            oldest = next(c for c, (a, _) in self._waiting.items() if a == address)
            if now - self._waiting[oldest][1] >= self.grace_s:
                self._evict(oldest)
        if len(self._waiting) >= limits.max_pending:
            oldest = next(iter(self._waiting))
            if now - self._waiting[oldest][1] >= self.grace_s:
                self._evict(oldest)
        while len(self._waiting) >= limits.max_pending_ceiling:
            self._evict(next(iter(self._waiting)))
        self._waiting[conn] = (address, now)
        self.by_address[address] += 1

    def _evict(self, conn: HubHttpProtocol) -> None:
        self.evicted += 1
        self.release(conn)  # before evict(), so the callers' loops always end
        conn.evict()

    def release(self, conn: HubHttpProtocol) -> None:
        entry = self._waiting.pop(conn, None)
        if entry is None:
            return
        address = entry[0]
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


class HubConfig(Config):
    """``uvicorn.Config`` carrying hub's limits and the state its protocols share."""

    def __init__(self, app: Any, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.pending = PendingConnections(limits)
        self.refusal_log = RateLimitedLog(log)


def _response(status: int, message: str, default_headers: list[tuple[bytes, bytes]],
              extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    body = message.encode("ascii") + b"\n"
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("ascii")]
    for name, value in (*default_headers, *extra,
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode("ascii")),
                        (b"connection", b"close")):
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


class HubHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, body, time and pending-connection bounds."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, HubConfig), "hub's protocols need a HubConfig"
        self.hub_config = config
        self.limits = config.limits
        self._in_head = True  # waiting for (the rest of) a request line and headers
        self._head_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._pending = False  # counted in PendingConnections
        self._deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._refused = False
        self._stall: asyncio.TimerHandle | None = None
        self._deferred: tuple[int, str, tuple[tuple[bytes, bytes], ...], bool] | None = None

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(closing_transport(transport, self.limits.close_timeout_s))
        address = self.client[0] if self.client else ""
        self.hub_config.pending.acquire(self, address)
        self._pending = True
        self._arm_deadline()

    def evict(self) -> None:
        """Dropped to make room for a newer connection (the instance cap is reached)."""
        self.hub_config.refusal_log.warning(
            "evicted", "dropping the oldest connection without a complete request: too "
            "many of them on this instance")
        self._refuse(503, "server busy; retry later", ((b"retry-after", b"1"),),
                     linger=self._head_bytes > 0)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_pending()
        self._cancel_deadline()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if isinstance(self.transport, ClosingTransport):
            self.transport.lost()
        super().connection_lost(exc)

    # -- a client that does not read its responses ---------------------------------------
    def pause_writing(self) -> None:
        # The write buffer is full: the application waits until the client reads. A client
        # that never does (pipelined requests, never read) would hold it forever.
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.handshake_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        self.hub_config.refusal_log.warning(
            "stalled", "aborting a connection from %s: it has not read its responses",
            self.client[0] if self.client else "?")
        self.transport.abort()

    def eof_received(self) -> None:
        # A refused client that half-closes: its answer is written, nothing else to wait for.
        if self._refused:
            self.transport.close()

    def _leave_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.hub_config.pending.release(self)

    # -- the request deadline -----------------------------------------------------------
    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.limits.handshake_timeout_s, self._timed_out)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.abort()  # mid-response with a body still arriving: nothing to say
            return
        # Lingering only matters when the client is sending: it must read the answer.
        self._refuse(408, "request not received in time",
                     linger=self._head_bytes > 0 or not self._in_head)

    # -- parsing ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: discard, never buffer
        self._unset_keepalive_if_required()
        if self._in_head:
            # Counted before the parser sees them: httptools buffers a header until it is
            # complete, so counting in on_header would come after the memory is spent.
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(*self._refusal)
                return
            self.hub_config.refusal_log.warning("invalid", "invalid HTTP request received")
            self._refuse(400, "invalid HTTP request")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._leave_pending()
                self._cancel_deadline()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "request header fields too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_count = 0
        self._body_bytes = 0
        if self.client:
            self.scope[PEER_KEY] = self.client[0]  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_LINE_BYTES:
            self._refusal = (414, "request line too long")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, "too many request header fields")
            raise _Refused
        if len(name) + len(value) + 2 > MAX_LINE_BYTES:
            self._refusal = (431, "request header field too large")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        length = next((value for name, value in self.headers if name == b"content-length"), b"")
        if length.strip().isdigit() and int(length) > self.limits.max_body_bytes:
            self._refusal = (413, "request body too large")
            raise _Refused
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._leave_pending()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._refusal = (413, "request body too large")
            raise _Refused
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._answer(*deferred)
            return
        if not self.transport.is_closing() and not self._refused:
            self._arm_deadline()  # the next request on this keep-alive connection

    # -- refusing -----------------------------------------------------------------------
    def _refuse(self, status: int, message: str,
                extra: tuple[tuple[bytes, bytes], ...] = (), *, linger: bool = True) -> None:
        """Answer ``status`` and close. With ``linger`` (the client may still be sending),
        shut the write side, discard what arrives and abort after the close timeout, so
        the client reads the answer instead of a connection reset."""
        if self._refused:
            return
        self._refused = True  # from now on, input is discarded
        self._leave_pending()
        self._cancel_deadline()
        if status != 503:
            self.hub_config.refusal_log.warning(
                str(status), "refused a request from %s: %s %s",
                self.client[0] if self.client else "?", status, message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.scope is not self.scope:
                # A pipelined request: the one before it is still being answered, and
                # answers go out in order. on_response_complete() sends this one.
                self._deferred = (status, message, extra, linger)
                return
            # The application, if running, sees a disconnect and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.abort()  # mid-response: nothing sensible left to say
                return
        # No answer when this request's application answered already (its own 413…).
        answered = cycle is not None and cycle.scope is self.scope and cycle.response_started
        self._answer(status, message, extra, linger, write=not answered)

    def _answer(self, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...],
                linger: bool, *, write: bool = True) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if write:
            transport.write(_response(status, message, self.server_state.default_headers,
                                      extra))
        if not linger:
            if isinstance(transport, ClosingTransport):
                transport.close_now()
            else:
                transport.abort()
            return
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer, then EOF
        self._linger = self.loop.call_later(self.limits.close_timeout_s, transport.abort)


# What uvicorn's WebSocket protocol sets on every connection to the same object for every
# connection of a server (its config and what comes from it, the server's shared state).
# Kept once on a per-server class instead of in each instance's dict: without them the
# instance dict stays small enough for CPython to share its keys across connections
# (a split dict), about 1.3 KB less on each (tests/test_compat.py checks the names).
# (Not ``default_headers``: uvicorn's server replaces that list every second, for the Date.)
PER_SERVER = ("config", "app", "loop", "logger", "root_path", "asgi_version", "app_state",
              "connections", "tasks", "ping_interval", "ping_timeout")
_MISSING = object()


class _PerServer:
    """A data descriptor for one of :data:`PER_SERVER`: the first connection's value is
    the class's; a connection that sets another (none does) keeps its own, aside."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self
        if owner._hub_overrides:  # type: ignore[attr-defined]
            own = owner._hub_overrides.get(obj)  # type: ignore[attr-defined]
            if own is not None and self.name in own:
                return own[self.name]
        try:
            return owner._hub_shared[self.name]  # type: ignore[attr-defined]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: Any, value: Any) -> None:
        cls = type(obj)
        shared = cls._hub_shared
        current = shared.get(self.name, _MISSING)
        if current is _MISSING:
            shared[self.name] = value
        elif current is not value:
            cls._hub_overrides.setdefault(obj, {})[self.name] = value


def per_server_class(base: type[HubWebSocketProtocol]) -> type[HubWebSocketProtocol]:
    """A subclass of ``base`` for one server (one uvicorn Config)."""
    namespace: dict[str, Any] = {name: _PerServer(name) for name in PER_SERVER}
    namespace["_hub_shared"] = {}
    namespace["_hub_overrides"] = weakref.WeakKeyDictionary()
    return type(base.__name__, (base,), namespace)


_SHARED_SCOPE: dict[str, Any] = {
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "extensions": {"websocket.http.response": {}},
}


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol whose closes are bounded in time.

    - ``close_timeout`` (uvicorn's wait for the peer's close frame) is hub's close timeout,
      after which the transport is closed, and aborted a close timeout later if the peer
      still has not read what is buffered;
    - an application close (4003, 4008, 1008…) does not wait for the write buffer to drain
      first: a peer that does not read would never let it;
    - a handshake the websockets parser refuses (a header line over its limit…) is
      answered, where uvicorn leaves the answer unsent and the socket open.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        grace = config.limits.close_timeout_s if isinstance(config, HubConfig) else 5.0
        self.close_timeout = grace
        # Memory per idle connection (README "Performance"): uvicorn's asyncio.Queue and
        # asyncio.Event, replaced by what it uses of them (tests/test_compat.py checks
        # that this is all it uses).
        self.queue = LeanInbox(self._drained)  # type: ignore[assignment]
        self.writable = LeanFlag(True)  # type: ignore[assignment]

    def _drained(self) -> None:
        # uvicorn's receive(): reading resumes once the application took every message.
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def receive(self) -> Awaitable[Any]:  # type: ignore[override]
        # uvicorn's receive() is a coroutine around queue.get() that resumes reading when
        # the queue is empty; LeanInbox does that itself (``_drained``), so the pending
        # receive of an idle connection is one coroutine frame, not two.
        return self.queue.get()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        super().connection_made(closing_transport(transport, self.close_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.transport, ClosingTransport):
            self.transport.lost()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            self.transport.close()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            # The same small dicts on every connection's scope (~0.4 KB): one copy, read
            # only (nothing in hub or the ASGI libraries it runs writes to them).
            for key, shared in _SHARED_SCOPE.items():
                if scope.get(key) == shared:
                    scope[key] = shared
            if self.client:
                scope[PEER_KEY] = self.client[0]

    async def send(self, message: Any) -> None:
        if (message["type"] == "websocket.close" and not self.writable.is_set()
                and self.handshake_complete and not self.close_sent
                and not self.disconnected and self.initial_response is None):
            self._close_now(message.get("code", 1000), message.get("reason", "") or "")
            return
        await super().send(message)
        if self.handshake_complete and getattr(self, "request", None) is not None:
            self._forget_handshake()

    def _forget_handshake(self) -> None:
        """The handshake is over: its parsed request and response (~2.5 KB of headers)
        are read by nobody any more; the ASGI scope keeps the request's headers. The
        websockets parser's generator frame keeps the request object itself for the
        connection's life, so its headers are emptied in place, not just dropped."""
        for message in (self.request, getattr(self, "response", None)):
            headers = getattr(message, "headers", None)
            if headers is not None:
                headers.clear()
        self.request = self.response = None  # type: ignore[assignment]

    def _close_now(self, code: int, reason: str) -> None:
        # uvicorn's close branch of send(), without its wait for `writable`.
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)


def hub_config(app: Any, settings: Settings, **kwargs: Any) -> HubConfig:
    """A uvicorn config that runs ``app`` behind hub's protocols and limits."""
    return HubConfig(app, limits=Limits.from_settings(settings), http=HubHttpProtocol,
                     ws=per_server_class(HubWebSocketProtocol), **kwargs)
