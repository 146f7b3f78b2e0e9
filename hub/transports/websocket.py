"""``/ws/events``: the spec's plain WebSocket protocol.

Only the wire format lives here (JSON texts, close codes, the client's messages); the
outbox, its writer, close-after-flush, expiry and the replay hold-back are the connection
core's (hub.connection). A broadcast never awaits a client: each event's frame goes
straight to the connection's transport when nothing is queued ahead of it, else into the
bounded outbox. A client whose outbox fills up is closed with 4008.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from hub.auth import AuthError, Principal, token_from_headers
from hub.connection import (
    Outbox,
    OutboxSubscriber,
    Path,
    Services,
    TokenLifetime,
    count_slow,
)
from hub.dispatch.filters import parse_filter
from hub.errors import ErrorCode, ProtocolError
from hub.events import Event
from hub.limits import TokenBucket
from hub.protocol import Action, ClientMessage, CloseCode, parse_client_message
from hub.protocol import server_message as control
from hub.refusals import Answer
from hub.transports.frames import frame_sink, text_frame

log = logging.getLogger("hub.websocket")
_DIRECT = Path.DIRECT
_ids = itertools.count(1)


class _PlainOutbox(Outbox):
    __slots__ = ()
    GONE = (WebSocketDisconnect, OSError, RuntimeError)


def event_frame(event: Event) -> bytes:
    """The event's text frame for ``/ws/events``, built once per event."""
    frame: bytes = event.encoded("ws", _encode_frame)
    return frame


def _encode_frame(event: Event) -> bytes:
    return text_frame(event.text.encode())


class PlainConnection(OutboxSubscriber):
    """A ``/ws/events`` connection: the connection core with the spec's JSON texts."""

    transport = "websocket"

    def __init__(self, websocket: WebSocket, principal: Principal, outbox_limit: int,
                 on_slow: Callable[[PlainConnection], None],
                 on_abort: Callable[[PlainConnection], None]) -> None:
        super().__init__(principal)
        self.websocket = websocket
        self.connection_id = f"ws_{next(_ids)}_{secrets.token_hex(4)}"
        # With a sink, frames go straight to the transport (shared, pre-encoded bytes) and
        # the outbox holds frames; without one, it holds texts for ASGI sends.
        sink = frame_sink(websocket.scope)
        self.outbox = _PlainOutbox(outbox_limit, sink,
                                   send=websocket.send_text if sink is None else None)
        self._on_slow = on_slow
        self._on_abort = on_abort
        self.hold_limit = outbox_limit
        self.lifetime: TokenLifetime | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def frame_path(self) -> str:
        """How its events reach the transport (for the hub_frame_path_connections metric)."""
        return self.outbox.path.value

    def expired(self) -> None:
        """Its token expired (hub.connection.TokenLifetime)."""
        self.abort(CloseCode.UNAUTHORIZED, "token expired")

    def close_after_error(self) -> None:
        """A send to it failed (see Dispatcher._deliver): close it."""
        self.abort(CloseCode.INTERNAL_ERROR, "internal error")

    # -- the outbox (hub.connection.Outbox) -----------------------------------------------
    def _send(self, event: Event, replay: bool = False) -> None:
        outbox = self.outbox
        item = event_frame(event) if outbox.path is _DIRECT else event.text
        if not outbox.put(item, not replay):
            self._overflowed()

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        """A hub message (a reply to the client, bounded by its message rate)."""
        text = control(name, data)
        direct = self.outbox.path is Path.DIRECT
        self._put(text_frame(text.encode()) if direct else text, bounded=False)

    def _put(self, item: str | bytes, bounded: bool) -> None:
        """Only live events are ``bounded`` by the outbox limit: replies are bounded by the
        client's message rate, replays by the history size."""
        if not self.outbox.put(item, bounded):
            self._overflowed()

    def _overflowed(self) -> None:
        self._on_slow(self)
        self.abort(CloseCode.SLOW_CONSUMER, "slow consumer: outbox full")

    # -- closing ------------------------------------------------------------------------
    def close_after_flush(self, code: int, reason: str) -> None:
        """Send what is queued, then close (graceful shutdown)."""
        websocket = self.websocket

        async def close() -> None:
            await websocket.close(code, reason)
        self.outbox.close_after_flush(close)

    def abort(self, code: int, reason: str) -> None:
        """Drop what is queued and close now (slow consumer, expiry, abuse)."""
        if not self.outbox.abort():
            return
        self._on_abort(self)  # stop fan-out to it now, not when its TCP connection ends
        # Kept on the connection: the loop holds tasks only weakly.
        self._closing = asyncio.get_running_loop().create_task(
            _close(self.websocket, code, reason))


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state is WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            await websocket.close(code, reason)


class PlainTransport:
    """The ``/ws/events`` endpoint of one hub instance."""

    def __init__(self, hub: Services) -> None:
        self.hub = hub
        self.connections: set[PlainConnection] = set()

    def asgi(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The endpoint as a bare ASGI app (what HubApp dispatches to without routing):
        the endpoint's own coroutine, so an open connection's stack has one frame less."""
        return self.endpoint(WebSocket(scope, receive, send))

    async def endpoint(self, websocket: WebSocket) -> None:
        hub = self.hub
        headers = websocket.headers
        if not hub.origins.allows_scope(websocket.scope):
            try:  # only to name the user in the log
                user: str | None = hub.verifier.verify(token_from_headers(headers)).user_id
            except AuthError:
                user = None
            await self._refuse(websocket, ErrorCode.ORIGIN_NOT_ALLOWED, "origin not allowed",
                               user)
            return
        try:
            principal = await hub.verifier.verify_async(token_from_headers(headers))
        except AuthError as exc:
            await self._refuse(websocket, exc.code, exc.message)
            return
        refusal = hub.limits.acquire(principal.user_id)
        if refusal is not None:
            await websocket.accept()
            await _close(websocket, CloseCode.TRY_AGAIN_LATER, refusal)
            return
        try:
            await websocket.accept()
            await self._serve(websocket, principal)
        finally:
            hub.limits.release(principal.user_id)

    async def _refuse(self, websocket: WebSocket, reason: str, message: str,
                      user: str | None = None) -> None:
        self.hub.metrics.auth_failures.labels(reason).inc()
        client = websocket.client
        answer = self.hub.refusals.refuse("/ws/events", client.host if client else None,
                                          reason, user)
        if answer is Answer.HTTP_403:
            # Before the accept: uvicorn answers HTTP 403, which clients count as a failed
            # attempt (their backoff grows) and which costs no WebSocket session.
            await websocket.close(CloseCode.UNAUTHORIZED)
            return
        # Accept, then close: a close before accept becomes an HTTP 403 that clients
        # report as 1006, and the spec promises them 4003.
        await websocket.accept()
        await _close(websocket, CloseCode.UNAUTHORIZED, message)

    async def _serve(self, websocket: WebSocket, principal: Principal) -> None:
        hub = self.hub
        conn = PlainConnection(websocket, principal, hub.settings.outbox_limit, self._slow,
                               hub.dispatcher.remove)
        self.connections.add(conn)
        hub.metrics.connections.labels(conn.transport).inc()
        hub.metrics.frame_path.labels(conn.transport, conn.frame_path).inc()
        hub.dispatcher.add(conn)
        conn.send_control("connection_established", {
            "user_id": principal.user_id,
            "connection_id": conn.connection_id,
            "instance_id": hub.settings.instance_id,
            "event_types": hub.dispatcher.subscribed_to(conn),
        })
        conn.lifetime = TokenLifetime(
            conn, leeway=hub.verifier.leeway, lead=hub.settings.token_expiring_lead_s,
            expire=conn.expired,
            notify=conn.send_control)
        revoked = hub.verifier.revoked
        if revoked is not None and revoked(principal):
            # Revoked while its handshake was being accepted (after the check at connect).
            conn.abort(CloseCode.UNAUTHORIZED, "token revoked")
        try:
            last_event_id = websocket.headers.get("last-event-id")
            if last_event_id:
                try:
                    self._resume(conn, last_event_id)
                except ProtocolError as exc:
                    conn.send_error(exc)
            else:
                # Until its first message: it may be a subscribe that resumes.
                conn.hold_for_first_message(hub.settings.resume_hold_s)
            await self._read(websocket, conn)
        finally:
            conn.lifetime.cancel()
            conn.cancel_resume()
            hub.dispatcher.remove(conn)
            self.connections.discard(conn)
            hub.metrics.connections.labels(conn.transport).dec()
            writer = conn.outbox.writer
            if writer is not None:
                if not writer.done() and not conn.outbox.closing_after_flush:
                    writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    def _slow(self, conn: PlainConnection) -> None:
        # What it had queued and the event that overflowed it are discarded with it.
        count_slow(self.hub.metrics, log, conn.transport, conn.connection_id,
                   conn.principal.user_id, conn.queued + 1)

    async def _read(self, websocket: WebSocket, conn: PlainConnection) -> None:
        settings = self.hub.settings
        # Made at the first message: a full bucket then is what one made at connect would
        # hold by then (it refills up to the burst), and an idle connection holds none.
        bucket: TokenBucket | None = None
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                if len(data) > settings.max_message_bytes:
                    conn.abort(CloseCode.MESSAGE_TOO_BIG, "message too big")
                    continue
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    conn.send_error(ProtocolError(
                        "binary frames must hold UTF-8 JSON", code=ErrorCode.INVALID_JSON))
                    continue
            if len(text) > settings.max_message_bytes:
                conn.abort(CloseCode.MESSAGE_TOO_BIG, "message too big")
                continue
            if bucket is None:
                bucket = TokenBucket(settings.client_rate, settings.client_burst)
            if not bucket.take():
                conn.abort(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
                continue
            try:
                await self._handle(conn, parse_client_message(text))
            except ProtocolError as exc:
                conn.send_error(exc)
            finally:
                conn.first_message_seen()

    async def _handle(self, conn: PlainConnection, message: ClientMessage) -> None:
        dispatcher = self.hub.dispatcher
        if message.action is Action.PING:
            conn.send_control("pong", {})
            return
        if message.action is Action.REFRESH:
            self._refresh(conn, message.token)
            return
        if message.action is Action.ACK:
            # No reply: acks are cumulative and frequent; only a bad one gets an error.
            self.hub.consumers.ack(conn, message.event_id)
            return
        types = dispatcher.check_types(message.event_types)
        start: str | None = None
        if message.action is Action.SUBSCRIBE:
            # Checked before anything changes: a malformed filter changes nothing.
            flt = parse_filter(message.filter) if message.has_filter else conn.filter
            if message.consumer is not None:
                consumers = self.hub.consumers
                if not consumers.check_bindable(conn, message.consumer):
                    record = await consumers.register(conn.principal, message.consumer,
                                                      message.last_event_id)
                    # (The read loop waits meanwhile: nothing else changes the connection.)
                    start = consumers.attach(conn, record)
            dispatcher.subscribe(conn, types)
            conn.filter = flt
        else:
            dispatcher.unsubscribe(conn, types)
        reply = dispatcher.subscription_reply(conn, types)
        if conn.consumer is not None:
            reply["consumer"] = conn.consumer.describe()
        conn.send_control("subscription_updated", reply)
        if start is not None:
            # A consumer resumes from its cursor (its last_event_id only chose where a new
            # one starts).
            self._resume(conn, start)
        elif (message.action is Action.SUBSCRIBE and message.last_event_id is not None
              and message.consumer is None):
            self._resume(conn, message.last_event_id)

    def _refresh(self, conn: PlainConnection, token: str | None) -> None:
        """In-band refresh: ``token_refreshed`` with the new ``exp``, or an ``error`` and
        the old token (and its expiry) stands."""
        lifetime = conn.lifetime
        assert lifetime is not None
        try:
            lifetime.refresh(self.hub.verifier, token)
        except AuthError as exc:
            self.hub.metrics.auth_failures.labels(exc.code).inc()
            conn.send_control("error", {"code": exc.code, "message": exc.message})
            return
        conn.send_control("token_refreshed", lifetime.refreshed_message())

    def _resume(self, conn: PlainConnection, last_event_id: object) -> None:
        """Start a replay (raises ProtocolError at once for a bad id or while one runs);
        ``resumed`` follows it. Client messages keep being read meanwhile."""
        conn.track_resume(self.hub.dispatcher.start_resume(conn, last_event_id))

    def revoke(self, covers: Callable[[Principal], bool]) -> int:
        """Close the connections whose token is revoked (4003 ``token revoked``)."""
        closing = [c for c in self.connections if covers(c.principal)]
        for conn in closing:
            conn.abort(CloseCode.UNAUTHORIZED, "token revoked")
        return len(closing)

    async def shutdown(self) -> None:
        """Flush every outbox, then close each connection with 1001."""
        for conn in tuple(self.connections):
            conn.close_after_flush(CloseCode.GOING_AWAY, "server shutting down")
        writers = [w for c in self.connections if (w := c.outbox.writer) is not None]
        if writers:
            await asyncio.wait(writers, timeout=self.hub.settings.shutdown_timeout_s)
