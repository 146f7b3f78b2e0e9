"""``/ws/events``: the spec's plain WebSocket protocol.

A broadcast never awaits a client: each event's frame goes straight to the connection's
transport when nothing is queued ahead of it (hub.transports.frames), else into a bounded
outbox that one writer task drains while the client pushes back. A client whose outbox
fills up is closed with 4008 instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from hub.auth import AuthError, Principal, token_from_headers
from hub.dispatch.base import Subscriber
from hub.events import Event
from hub.exceptions import ProtocolError
from hub.limits import TokenBucket
from hub.protocol import Action, ClientMessage, CloseCode, error_message, parse_client_message
from hub.protocol import server_message as control
from hub.refusals import Answer
from hub.transports.frames import frame_sink, text_frame, write_queued

if TYPE_CHECKING:
    from hub.app import Hub

log = logging.getLogger("hub.websocket")
_ids = itertools.count(1)


class PlainConnection(Subscriber):
    transport = "websocket"

    def __init__(self, websocket: WebSocket, principal: Principal, outbox_limit: int,
                 on_slow: Callable[[PlainConnection], None],
                 on_abort: Callable[[PlainConnection], None]) -> None:
        super().__init__(principal)
        self.websocket = websocket
        self.connection_id = f"ws_{next(_ids)}_{secrets.token_hex(4)}"
        # With a sink, frames go straight to the transport (shared, pre-encoded bytes) and
        # the outbox holds frames; without one, it holds texts for ASGI sends.
        self._sink = frame_sink(websocket.scope)
        # Created on first use: an empty deque is ~600 bytes, and most connections never
        # queue anything when frames go straight to the transport.
        self._outbox: deque[str | bytes] | None = None
        self._limit = outbox_limit
        self._close_after_flush: tuple[int, str] | None = None
        self._closed = False
        self._on_slow = on_slow
        self._on_abort = on_abort
        self.writer: asyncio.Task[None] | None = None
        self.resume_task: asyncio.Task[Any] | None = None
        self.hold_limit = outbox_limit

    @property
    def frame_path(self) -> str:
        """How its events reach the transport (for the hub_frame_path_connections metric)."""
        return "direct" if self._sink is not None else "asgi"

    def close_after_error(self) -> None:
        """A send to it failed (see Dispatcher._deliver): close it."""
        self.abort(CloseCode.INTERNAL_ERROR, "internal error")

    # -- outbox -------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._outbox) if self._outbox is not None else 0

    def replay_room(self) -> int:
        return 0 if self._closed else self._limit - self.queued

    async def wait_room(self) -> None:
        # The writer runs until the outbox is empty (or the connection is gone).
        writer = self.writer
        if writer is not None and not writer.done():
            await asyncio.wait((writer,))

    @property
    def closed(self) -> bool:
        # Closing after a flush (shutdown) takes nothing more: a replay stops there.
        return self._closed or self._close_after_flush is not None or super().closed

    def _send(self, event: Event, replay: bool = False) -> None:
        self._put(event.frame if self._sink is not None else event.text, bounded=not replay)

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        self.enqueue(control(name, data))

    def enqueue(self, text: str) -> None:
        """Queue a control message (a reply to the client, bounded by its message rate)."""
        self._put(text_frame(text.encode()) if self._sink is not None else text, bounded=False)

    def _put(self, item: str | bytes, bounded: bool) -> None:
        """Send or queue one frame. Only live events are ``bounded`` by the outbox limit:
        replies are bounded by the client's message rate, replays by the history size."""
        if self._closed or self._close_after_flush is not None:
            return
        sink = self._sink
        if sink is not None and not self._outbox and sink.ready():
            # Nothing queued ahead of it and no backpressure: out now, no task switch.
            assert isinstance(item, bytes)
            sink.write(item)
            return
        if bounded and self.queued >= self._limit:
            self._on_slow(self)
            self.abort(CloseCode.SLOW_CONSUMER, "slow consumer: outbox full")
            return
        if self._outbox is None:
            self._outbox = deque()
        self._outbox.append(item)
        self._start_writer()

    def _start_writer(self) -> None:
        # A writer task exists only while something waits to be sent: an idle connection
        # (most of them, most of the time) costs no task.
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._run_writer())

    async def _drain(self) -> None:
        ws, sink, outbox = self.websocket, self._sink, self._outbox
        if outbox is None:
            return
        if sink is not None:
            await write_queued(sink, outbox)
            return
        while outbox:
            item = outbox.popleft()
            assert isinstance(item, str)
            await ws.send_text(item)

    async def _run_writer(self) -> None:
        ws = self.websocket
        try:
            await self._drain()
            if self._close_after_flush is not None:
                code, reason = self._close_after_flush
                self._closed = True
                await ws.close(code, reason)
        except (WebSocketDisconnect, OSError, RuntimeError):
            # The peer went away (or the socket was closed under us): nothing left to send.
            self._closed = True

    # -- closing ------------------------------------------------------------------------
    def close_after_flush(self, code: int, reason: str) -> None:
        """Send what is queued, then close (graceful shutdown)."""
        if self._closed or self._close_after_flush is not None:
            return
        self._close_after_flush = (code, reason)
        self._start_writer()

    def abort(self, code: int, reason: str) -> None:
        """Drop what is queued and close now (slow consumer, expiry, abuse)."""
        if self._closed:
            return
        self._closed = True
        if self._outbox is not None:
            self._outbox.clear()
        self._on_abort(self)  # stop fan-out to it now, not when its TCP connection ends
        if self.writer is not None:
            # The writer may be stuck in a send to a client that does not read; a frame
            # already handed to the transport stays whole, so cancelling it is safe.
            self.writer.cancel()
        asyncio.get_running_loop().create_task(_close(self.websocket, code, reason))


def _resumed(conn: PlainConnection, task: asyncio.Task[Any]) -> None:
    if conn.resume_task is task:
        conn.resume_task = None
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, ProtocolError):
        conn.enqueue(error_message(exc))
    elif exc is not None:
        log.error("resume failed on %s", conn.connection_id, exc_info=exc)
        conn.enqueue(error_message(ProtocolError("the resume failed; live events continue",
                                                 code="history_unavailable")))
    else:
        conn.send_control("resumed", task.result().message())


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state is WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            await websocket.close(code, reason)


class PlainTransport:
    """The ``/ws/events`` endpoint of one hub instance."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.connections: set[PlainConnection] = set()

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The endpoint as a bare ASGI app (what HubApp dispatches to without routing)."""
        await self.endpoint(WebSocket(scope, receive, send))

    async def endpoint(self, websocket: WebSocket) -> None:
        hub = self.hub
        headers = websocket.headers
        if not hub.origins.allows_scope(websocket.scope):
            try:  # only to name the user in the log
                user: str | None = hub.verifier.verify(token_from_headers(headers)).user_id
            except AuthError:
                user = None
            await self._refuse(websocket, "origin_not_allowed", "origin not allowed", user)
            return
        try:
            principal = hub.verifier.verify(token_from_headers(headers))
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
        conn.enqueue(control("connection_established", {
            "user_id": principal.user_id,
            "connection_id": conn.connection_id,
            "instance_id": hub.settings.instance_id,
            "event_types": hub.dispatcher.subscribed_to(conn),
        }))
        expiry = self._schedule_expiry(conn)
        try:
            last_event_id = websocket.headers.get("last-event-id")
            if last_event_id:
                try:
                    self._resume(conn, last_event_id)
                except ProtocolError as exc:
                    conn.enqueue(error_message(exc))
            else:
                # Until its first message: it may be a subscribe that resumes.
                conn.hold_for_first_message(hub.settings.resume_hold_s)
            await self._read(websocket, conn)
        finally:
            if expiry is not None:
                expiry.cancel()
            if conn.resume_task is not None:
                conn.resume_task.cancel()
            hub.dispatcher.remove(conn)
            self.connections.discard(conn)
            hub.metrics.connections.labels(conn.transport).dec()
            writer = conn.writer
            if writer is not None:
                if not writer.done() and conn._close_after_flush is None:
                    writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    def _schedule_expiry(self, conn: PlainConnection) -> asyncio.TimerHandle | None:
        expires_at = conn.principal.expires_at
        if expires_at is None:
            return None
        delay = max(0.0, expires_at + self.hub.verifier.leeway - time.time())
        return asyncio.get_running_loop().call_later(
            delay, conn.abort, CloseCode.UNAUTHORIZED, "token expired")

    def _slow(self, conn: PlainConnection) -> None:
        metrics = self.hub.metrics
        metrics.slow_consumers.labels(conn.transport).inc()
        # What it had queued and the event that overflowed it are discarded with it.
        metrics.dropped.labels("slow_consumer").inc(conn.queued + 1)
        log.warning("closing slow consumer %s (user %s)", conn.connection_id,
                    conn.principal.user_id)

    async def _read(self, websocket: WebSocket, conn: PlainConnection) -> None:
        settings = self.hub.settings
        bucket = TokenBucket(settings.client_rate, settings.client_burst)
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
                    conn.enqueue(error_message(ProtocolError(
                        "binary frames must hold UTF-8 JSON", code="invalid_json")))
                    continue
            if len(text) > settings.max_message_bytes:
                conn.abort(CloseCode.MESSAGE_TOO_BIG, "message too big")
                continue
            if not bucket.take():
                conn.abort(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
                continue
            try:
                await self._handle(conn, parse_client_message(text))
            except ProtocolError as exc:
                conn.enqueue(error_message(exc))
            finally:
                conn.first_message_seen()

    async def _handle(self, conn: PlainConnection, message: ClientMessage) -> None:
        dispatcher = self.hub.dispatcher
        if message.action is Action.PING:
            conn.enqueue(control("pong"))
            return
        types = dispatcher.check_types(message.event_types)
        if message.action is Action.SUBSCRIBE:
            dispatcher.subscribe(conn, types)
        else:
            dispatcher.unsubscribe(conn, types)
        conn.enqueue(control("subscription_updated", dispatcher.subscription_reply(conn, types)))
        if message.action is Action.SUBSCRIBE and message.last_event_id is not None:
            self._resume(conn, message.last_event_id)

    def _resume(self, conn: PlainConnection, last_event_id: object) -> None:
        """Start a replay (raises ProtocolError at once for a bad id or while one runs);
        ``resumed`` follows it. Client messages keep being read meanwhile."""
        task = self.hub.dispatcher.start_resume(conn, last_event_id)
        conn.resume_task = task
        task.add_done_callback(lambda done: _resumed(conn, done))

    async def shutdown(self) -> None:
        """Flush every outbox, then close each connection with 1001."""
        for conn in tuple(self.connections):
            conn.close_after_flush(CloseCode.GOING_AWAY, "server shutting down")
        writers = [c.writer for c in self.connections if c.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=self.hub.settings.shutdown_timeout_s)
