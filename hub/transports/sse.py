"""``GET /events/stream``: Server-Sent Events on the connection core.

Only the wire format is here: each event is ``id:``, ``event:`` (its type) and ``data:``
(the envelope, one line of JSON); hub messages (``connection_established``, ``resumed``,
``history_truncated``, ``token_expired``, ``error``) are events of those names without an
``id:`` (so they never move the client's Last-Event-ID); a ``retry:`` hint opens the
stream and a comment line is the heartbeat. The outbox (hub.connection.Outbox, on its ASGI
path: chunks of the response body), its bound and slow-consumer cut-off, the resume, the
expiry and the shutdown are the core's, as for the WebSocket transports.

Every refusal (origin, token, parameters, connection limit) is an HTTP error with a JSON
body before the stream starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from hub._compat import uvicorn as uvicorn_compat
from hub.auth import Principal
from hub.connection import (
    ConnState,
    Outbox,
    OutboxSubscriber,
    Services,
    count_slow,
    schedule_expiry,
)
from hub.dispatch.filters import EventFilter, parse_types, split_params
from hub.errors import CloseCode, ErrorCode, ProtocolError
from hub.events import Event, is_event_id, now_timestamp
from hub.http import authenticate, error_response

log = logging.getLogger("hub.sse")
_ids = itertools.count(1)

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store"),
    # nginx (and proxies that honour it) must pass each event on as it comes.
    (b"x-accel-buffering", b"no"),
]
HEARTBEAT = b": heartbeat\n\n"


def event_chunk(event: Event) -> bytes:
    """The event as one Server-Sent Event, built once per event."""
    chunk: bytes = event.encoded("sse", _encode)
    return chunk


def _encode(event: Event) -> bytes:
    # The envelope's JSON has no raw newline (orjson escapes them), so one data: line.
    return (f"id: {event.id}\nevent: {event.type}\ndata: ".encode()
            + event.text.encode() + b"\n\n")


def control_chunk(name: str, data: dict[str, Any]) -> bytes:
    body = orjson.dumps({"type": name, "timestamp": now_timestamp(), "data": data})
    return b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"


class _SseOutbox(Outbox):
    __slots__ = ()
    GONE = (OSError, RuntimeError)


class SseConnection(OutboxSubscriber):
    """One ``/events/stream`` response as the dispatcher sees it."""

    transport = "sse"

    def __init__(self, transport: SseTransport, send: Send, principal: Principal) -> None:
        super().__init__(principal)
        self._transport = transport
        self._raw_send = send
        self.connection_id = f"sse_{next(_ids)}_{secrets.token_hex(4)}"
        limit = transport.hub.settings.outbox_limit
        self.outbox = _SseOutbox(limit, send=self._write)
        self.hold_limit = limit
        self.done = asyncio.Event()
        self.aborted = False

    async def _write(self, chunk: bytes) -> None:
        await self._raw_send({"type": "http.response.body", "body": chunk, "more_body": True})

    def _send(self, event: Event, replay: bool = False) -> None:
        self._put(event_chunk(event), bounded=not replay)

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        self._put(control_chunk(name, data), bounded=False)

    def send_raw(self, chunk: bytes) -> None:
        self._put(chunk, bounded=False)

    def _put(self, chunk: bytes, bounded: bool) -> None:
        if not self.outbox.put(chunk, bounded):
            count_slow(self._transport.hub.metrics, log, self.transport, self.connection_id,
                       self.principal.user_id, self.queued + 1)
            self.abort()

    def close_after_error(self) -> None:
        self.abort()

    # -- ending ---------------------------------------------------------------------------
    def close_after_flush(self) -> None:
        """Send what is queued, then end the response (shutdown, expiry)."""
        async def end() -> None:
            with contextlib.suppress(*_SseOutbox.GONE):
                await self._raw_send({"type": "http.response.body", "body": b"",
                                      "more_body": False})
            self.done.set()
        self.outbox.close_after_flush(end)

    def abort(self) -> None:
        """Drop what is queued and the connection (slow consumer, failed send)."""
        if not self.outbox.abort():
            return
        self.aborted = True
        self._transport.hub.dispatcher.remove(self)
        self.done.set()

    def expire(self) -> None:
        self._end_with("token_expired", "token expired")

    def _end_with(self, name: str, message: str) -> None:
        # As Socket.IO's notice: the code is the WebSocket transports' close code.
        self.send_control(name, {"code": CloseCode.UNAUTHORIZED, "message": message})
        self.close_after_flush()


class SseTransport:
    """The ``/events/stream`` endpoint of one hub instance."""

    def __init__(self, hub: Services) -> None:
        self.hub = hub
        self.connections: set[SseConnection] = set()

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The endpoint as a bare ASGI app (HubApp hands it the server's own ``send``, so
        a slow consumer's connection can be dropped, see hub._compat.uvicorn)."""
        if scope.get("method") != "GET":
            await error_response(405, ErrorCode.PROTOCOL_ERROR, "use GET",
                                 headers={"allow": "GET"})(scope, receive, send)
            return
        request = Request(scope, receive)
        refusal = await self._refusal(request)
        if isinstance(refusal, JSONResponse):
            await refusal(scope, receive, send)
            return
        principal, types, flt, last_event_id = refusal
        hub = self.hub
        denied = hub.limits.acquire(principal.user_id)
        if denied is not None:
            await error_response(503, ErrorCode.TOO_MANY_CONNECTIONS, denied,
                                 headers={"Retry-After": "1"})(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await self._serve(scope, receive, send, principal, types, flt, last_event_id)
        finally:
            hub.limits.release(principal.user_id)

    async def _refusal(self, request: Request) -> JSONResponse | tuple[
            Principal, list[str] | None, EventFilter | None, str | None]:
        hub = self.hub
        principal = authenticate(hub, request.scope, request.headers)
        if isinstance(principal, JSONResponse):
            return principal
        try:
            params, flt = split_params(request.query_params.multi_items(),
                                       ("types", "last_event_id"))
            types = (hub.dispatcher.check_types(parse_types(params["types"]))
                     if "types" in params else None)
            # EventSource sends the header on its own reconnects; it wins over the
            # parameter the first URL may still carry.
            last_event_id = request.headers.get("last-event-id") or params.get("last_event_id")
            if last_event_id is not None and not is_event_id(last_event_id):
                raise ProtocolError("Last-Event-ID must be an event id like 1700000000000-0",
                                    code=ErrorCode.INVALID_LAST_EVENT_ID)
        except ProtocolError as exc:
            return error_response(400, exc.code, exc.message)
        return principal, types, flt, last_event_id

    async def _serve(self, scope: Scope, receive: Receive, send: Send, principal: Principal,
                     types: list[str] | None, flt: EventFilter | None,
                     last_event_id: str | None) -> None:
        hub = self.hub
        conn = SseConnection(self, send, principal)
        conn.filter = flt
        self.connections.add(conn)
        hub.metrics.connections.labels(conn.transport).inc()
        hub.dispatcher.add(conn, types)
        conn.send_raw(f"retry: {hub.settings.sse_retry_ms}\n\n".encode())
        conn.send_control("connection_established", {
            "user_id": principal.user_id,
            "connection_id": conn.connection_id,
            "instance_id": hub.settings.instance_id,
            "event_types": hub.dispatcher.subscribed_to(conn),
            **({"filter": flt.describe()} if flt is not None else {}),
        })
        expiry = schedule_expiry(principal, hub.verifier.leeway, conn.expire)
        if last_event_id is not None:
            conn.track_resume(hub.dispatcher.start_resume(conn, last_event_id))
        watchers = [asyncio.ensure_future(_watch_disconnect(receive, conn)),
                    asyncio.ensure_future(self._heartbeat(conn))]
        try:
            await conn.done.wait()
        finally:
            for watcher in watchers:
                watcher.cancel()
            if expiry is not None:
                expiry.cancel()
            conn.cancel_resume()
            hub.dispatcher.remove(conn)
            self.connections.discard(conn)
            hub.metrics.connections.labels(conn.transport).dec()
            writer = conn.outbox.writer
            if conn.aborted or conn.outbox.state is ConnState.OPEN:
                # Gone or cut off: nothing more goes out. A slow consumer's connection is
                # dropped now (what it never read is discarded).
                conn.outbox.abort()
                if conn.aborted:
                    uvicorn_compat.abort_http(send)
            if writer is not None:
                with contextlib.suppress(asyncio.CancelledError, *_SseOutbox.GONE):
                    await writer

    async def _heartbeat(self, conn: SseConnection) -> None:
        every = self.hub.settings.sse_heartbeat_s
        while conn.outbox.state is ConnState.OPEN:
            await asyncio.sleep(every)
            conn.send_raw(HEARTBEAT)

    def revoke(self, covers: Callable[[Principal], bool]) -> int:
        """End the streams whose token is revoked, after a ``token_revoked`` event (an
        ``EventSource`` reconnects, and its token is refused then)."""
        closing = [c for c in self.connections if covers(c.principal) and not c.closed]
        for conn in closing:
            conn._end_with("token_revoked", "token revoked")
        return len(closing)

    async def shutdown(self) -> None:
        """Flush every stream (the shutdown notice included), then end it."""
        for conn in tuple(self.connections):
            conn.close_after_flush()
        waits = [asyncio.ensure_future(c.done.wait()) for c in self.connections]
        if waits:
            _done, pending = await asyncio.wait(waits,
                                                timeout=self.hub.settings.shutdown_timeout_s)
            for wait in pending:
                wait.cancel()
        for conn in tuple(self.connections):
            conn.abort()  # what did not flush in time


async def _watch_disconnect(receive: Receive, conn: SseConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            conn.outbox.abort()
            conn.done.set()
            return
