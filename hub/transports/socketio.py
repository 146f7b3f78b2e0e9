"""Socket.IO v4 at ``/socket.io/``: python-socketio's server, fed by hub's dispatcher.

Each socket is a member of the dispatcher's rooms (one per event type) and of the same
rooms in python-socketio's manager, so emits from external python-socketio processes keep
working. Hub events skip python-socketio's per-recipient tasks: the packet is encoded once
per event and queued on each Engine.IO socket, whose single writer sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import socketio
from engineio import packet as eio_packet

from hub.auth import AuthError, Principal, token_from_headers
from hub.dispatch.base import Subscriber
from hub.dispatch.manager import queue_eio_packet
from hub.events import Event
from hub.exceptions import ProtocolError
from hub.transports.frames import FrameSink, frame_sink, text_frame, write_queued

if TYPE_CHECKING:
    from hub.app import Hub

log = logging.getLogger("hub.socketio")
NAMESPACE = "/"


class SocketIOConnection(Subscriber):
    """A Socket.IO socket as the dispatcher sees it.

    Over long-polling, events go through engine.io's queue. Once the socket is on a
    WebSocket served by uvicorn, they take the same path as ``/ws/events``: the event's
    Engine.IO frame, built once, written straight to the transport, with a bounded outbox
    and a writer of our own for backpressure. The switch waits until engine.io has sent
    what it queued (the CONNECT packet, or what was pending at the upgrade), so events
    never overtake it."""

    transport = "socketio"

    def __init__(self, transport: SocketIOTransport, sid: str, eio_sid: str,
                 principal: Principal) -> None:
        super().__init__(principal)
        self.sid = sid
        self.eio_sid = eio_sid
        self._transport = transport
        self._server = transport.sio
        self._limit = transport.hub.settings.outbox_limit
        self.kicked = False
        self.expiry: asyncio.TimerHandle | None = None
        self._sink: FrameSink | None = None
        self._direct = False  # engine.io's queue is drained: frames may go out directly
        self._outbox: deque[bytes] | None = None  # created on first use (~600 bytes)
        self.drained = asyncio.Event()  # the outbox is empty (for a graceful stop)
        self.drained.set()
        self._writer: asyncio.Task[None] | None = None

    # -- sending ------------------------------------------------------------------------
    def _send(self, event: Event, replay: bool = False) -> None:
        if self._sink is None and not self._try_attach():
            # One packet object per event per instance, shared by all its recipients.
            self._queue(event.socketio_packet, bounded=not replay)
            return
        self._put(event.socketio_frame, bounded=not replay)

    def emit_now(self, name: str, data: Any) -> None:
        """Send a hub-originated Socket.IO event (``resumed``, ``history_truncated``…) in
        order with the events around it."""
        text = "2" + orjson.dumps([name, data]).decode()
        if self._sink is None and not self._try_attach():
            self._queue(eio_packet.Packet(eio_packet.MESSAGE, text))
            return
        self._put(text_frame(("4" + text).encode()), bounded=False)

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        self.emit_now(name, data)

    def _queue(self, pkt: eio_packet.Packet, bounded: bool = False) -> None:
        """Through engine.io's queue; only live events count against the limit."""
        if self.kicked:
            return
        size = queue_eio_packet(self._server, self.eio_sid, pkt)
        if bounded and size is not None and size > self._limit:
            self._transport.kick_slow(self)

    def _put(self, frame: bytes, bounded: bool) -> None:
        if self.kicked:
            return
        sink = self._sink
        assert sink is not None
        if self._direct and not self._outbox and sink.ready():
            sink.write(frame)
            return
        if bounded and self.queued >= self._limit:
            self._transport.kick_slow(self)
            return
        if self._outbox is None:
            self._outbox = deque()
        self._outbox.append(frame)
        self.drained.clear()
        if self._direct:
            self._start_writer()  # before _direct, the switch-over writer is running

    # -- the direct path ----------------------------------------------------------------
    def _try_attach(self) -> bool:
        """Use the WebSocket this socket was upgraded to, once the upgrade is complete."""
        sink = self._transport.sink_for(self.eio_sid)
        if sink is None:
            return False
        self.attach(sink)
        return True

    def attach(self, sink: FrameSink) -> None:
        if self._sink is not None or self.kicked:
            return
        self._sink = sink
        self._writer = asyncio.get_running_loop().create_task(self._switch_over(sink))

    async def _switch_over(self, sink: FrameSink) -> None:
        sock = self._server.eio.sockets.get(self.eio_sid)
        if sock is not None:
            # engine.io's writer first: what it queued before us must go out before us.
            await sock.queue.join()
        await sink.wait_ready()
        # engine.io's writer, if it was waiting for the transport too, woke before us;
        # one turn of the loop lets it finish the frames it was holding.
        await asyncio.sleep(0)
        self._direct = True
        await self._drain(sink)

    def _start_writer(self) -> None:
        # Only while frames wait: an idle socket costs no task of ours.
        if self._writer is None or self._writer.done():
            assert self._sink is not None
            self._writer = asyncio.get_running_loop().create_task(self._drain(self._sink))

    async def _drain(self, sink: FrameSink) -> None:
        if self._outbox is not None:
            await write_queued(sink, self._outbox)
        self.drained.set()

    @property
    def queued(self) -> int:
        return len(self._outbox) if self._outbox is not None else 0

    def stop_writer(self) -> None:
        if self._outbox is not None:
            self._outbox.clear()
        self.drained.set()
        if self._writer is not None:
            self._writer.cancel()

    def rooms_changed(self, joined: set[str], left: set[str]) -> None:
        manager = self._server.manager
        for room in joined:
            manager.basic_enter_room(self.sid, NAMESPACE, room)
        for room in left:
            manager.basic_leave_room(self.sid, NAMESPACE, room)


class _Server(socketio.AsyncServer):  # type: ignore[misc]
    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        await super()._handle_eio_disconnect(eio_sid, reason)
        sock = self.eio.sockets.get(eio_sid)
        if (sock is not None and not sock.upgraded
                and reason == self.eio.reason.CLIENT_DISCONNECT):
            # A client that leaves over long-polling may leave a GET waiting on its queue
            # (engine.io does not wake it), holding its disconnect and the server's
            # shutdown for up to a ping interval: wake it with the end marker. Only then:
            # on a WebSocket, or when the server closes (CLOSE still queued), the marker
            # would end the writer before the CLOSE packet goes out.
            sock.queue.put_nowait(None)


class SocketIOTransport:
    """python-socketio's AsyncServer wired to the dispatcher."""

    def __init__(self, hub: Hub, manager: Any) -> None:
        self.hub = hub
        settings = hub.settings
        # hub's one Origin check (hub.auth.OriginPolicy; HubApp applies it before this app
        # too), instead of python-engineio's, which compares text and trusts any client's
        # X-Forwarded-Host; engine.io still uses the answer for its CORS headers.
        def origins(origin: str, environ: dict[str, Any]) -> bool:
            return hub.origins.allows_scope(environ["asgi.scope"])
        self.sio = _Server(
            async_mode="asgi",
            client_manager=manager,
            cors_allowed_origins=origins,
            max_http_buffer_size=settings.max_message_bytes,
            logger=False,
            engineio_logger=False,
        )
        manager.on_connected = self._activate
        self.connections: dict[str, SocketIOConnection] = {}
        self._pending: dict[str, tuple[Principal, list[str] | None, Any]] = {}
        self.sio.on("connect", self._connect)
        self.sio.on("disconnect", self._disconnect)
        self.sio.on("subscribe", self._subscribe)
        self.sio.on("unsubscribe", self._unsubscribe)
        self._engineio_app = socketio.ASGIApp(self.sio, socketio_path=None)
        self._upgrade_sinks: dict[str, FrameSink] = {}

    async def asgi_app(self, scope: Any, receive: Any, send: Any) -> None:
        """python-socketio's ASGI app, noting the WebSocket of each polling→websocket
        upgrade (its request carries the Engine.IO ``sid``) for direct frame writes."""
        if scope["type"] == "websocket":
            sid = parse_qs(scope.get("query_string", b"").decode()).get("sid")
            sink = frame_sink(scope) if sid else None
            if sid and sink is not None:
                self._upgrade_sinks[sid[0]] = sink
        await self._engineio_app(scope, receive, send)

    def sink_for(self, eio_sid: str) -> FrameSink | None:
        """The WebSocket a polling socket was upgraded to, once the upgrade is done."""
        if eio_sid not in self._upgrade_sinks:
            return None
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is None or not sock.upgraded or sock.upgrading:
            return None
        return self._upgrade_sinks.pop(eio_sid)

    # -- connection lifecycle -----------------------------------------------------------
    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        hub = self.hub
        auth = auth if isinstance(auth, dict) else {}
        token = auth.get("token")
        if not isinstance(token, str) or not token:
            token = token_from_headers(_headers(environ))
        try:
            principal = hub.verifier.verify(token)
        except AuthError as exc:
            hub.metrics.auth_failures.labels(exc.code).inc()
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"code": 4003, "reason": exc.code, "message": exc.message}
            ) from None
        types = None
        if "event_types" in auth:
            try:
                types = hub.dispatcher.check_types(auth["event_types"])
            except ProtocolError as exc:
                raise socketio.exceptions.ConnectionRefusedError(
                    exc.message, {"code": exc.code}) from None
        refusal = hub.limits.acquire(principal.user_id)
        if refusal is not None:
            raise socketio.exceptions.ConnectionRefusedError(refusal, {"code": 1013})
        self._pending[sid] = (principal, types, auth.get("last_event_id"))

    def _activate(self, sid: str) -> None:
        """Called once the client has been sent its CONNECT packet: start delivering."""
        pending = self._pending.pop(sid, None)
        if pending is None:
            return
        principal, types, last_event_id = pending
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        conn = SocketIOConnection(self, sid, eio_sid, principal)
        environ = self.sio.environ.get(eio_sid) or {}
        sink = frame_sink(environ.get("asgi.scope") or {})
        if sink is not None:  # connected over a WebSocket from the start
            conn.attach(sink)
        self.connections[sid] = conn
        self.hub.metrics.connections.labels(conn.transport).inc()
        self.hub.dispatcher.add(conn, types)
        conn.emit_now("connection_established", {
            "user_id": principal.user_id, "connection_id": sid,
            "instance_id": self.hub.settings.instance_id,
            "event_types": self.hub.dispatcher.subscribed_to(conn),
        })
        if principal.expires_at is not None:
            delay = max(0.0, principal.expires_at + self.hub.verifier.leeway - time.time())
            conn.expiry = asyncio.get_running_loop().call_later(
                delay, self._expire, conn)
        if last_event_id is not None:
            conn.begin_replay()  # hold live events until the replay is queued
            asyncio.get_running_loop().create_task(self._resume_task(conn, last_event_id))

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        pending = self._pending.pop(sid, None)
        if pending is not None:
            self.hub.limits.release(pending[0].user_id)
            return
        conn = self.connections.pop(sid, None)
        if conn is None:
            return
        self._upgrade_sinks.pop(conn.eio_sid, None)
        conn.stop_writer()
        if conn.expiry is not None:
            conn.expiry.cancel()
        self.hub.dispatcher.remove(conn)
        self.hub.limits.release(conn.principal.user_id)
        self.hub.metrics.connections.labels(conn.transport).dec()

    def _expire(self, conn: SocketIOConnection) -> None:
        conn.emit_now("token_expired", {"code": 4003, "message": "token expired"})
        self._kick(conn)

    def kick_slow(self, conn: SocketIOConnection) -> None:
        self.hub.metrics.slow_consumers.labels(conn.transport).inc()
        sock = self.sio.eio.sockets.get(conn.eio_sid)
        dropped = conn.queued + (sock.queue.qsize() if sock is not None else 0)
        self.hub.metrics.dropped.labels("slow_consumer").inc(dropped)
        log.warning("disconnecting slow Socket.IO consumer %s (user %s)", conn.sid,
                    conn.principal.user_id)
        self._kick(conn, drop_queue=True)

    def _kick(self, conn: SocketIOConnection, drop_queue: bool = False) -> None:
        if conn.kicked:
            return
        conn.kicked = True
        if drop_queue:
            conn.stop_writer()
            sock = self.sio.eio.sockets.get(conn.eio_sid)
            if sock is not None:
                # Free the backlog now; the socket is going away.
                while not sock.queue.empty():
                    sock.queue.get_nowait()
                    sock.queue.task_done()
        asyncio.get_running_loop().create_task(self._disconnect_now(conn))

    async def _disconnect_now(self, conn: SocketIOConnection) -> None:
        # What is still queued (a token_expired notice) goes out first, within reason.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.drained.wait(), 5)
        await self.sio.disconnect(conn.sid)
        await self._close_transport(conn.eio_sid)

    async def _close_transport(self, eio_sid: str) -> None:
        """Close the Engine.IO socket without waiting for its queue to be sent: the writer
        of a slow or vanished client may never get there (engine.io's own disconnect would
        wait for ever)."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is not None:
            await sock.close(wait=False, reason=self.sio.eio.reason.SERVER_DISCONNECT)

    # -- client events ------------------------------------------------------------------
    async def _subscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        conn = self.connections.get(sid)
        if conn is None:
            return _error(ProtocolError("not connected", code="not_connected"))
        dispatcher = self.hub.dispatcher
        try:
            payload = data if isinstance(data, dict) else {}
            if not isinstance(data, dict):
                raise ProtocolError("subscribe takes {event_types, last_event_id?}",
                                    code="not_an_object")
            types = dispatcher.check_types(payload.get("event_types"))
            dispatcher.subscribe(conn, types)
            ack: dict[str, Any] = {"subscribed_to": dispatcher.subscribed_to(conn)}
            if payload.get("last_event_id") is not None:
                result = await self._resume(conn, payload["last_event_id"])
                ack.update(replayed=result["replayed"], truncated=result["truncated"],
                           first_retained_id=result["first_retained_id"])
        except ProtocolError as exc:
            return _error(exc)
        return ack

    async def _unsubscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        conn = self.connections.get(sid)
        if conn is None:
            return _error(ProtocolError("not connected", code="not_connected"))
        dispatcher = self.hub.dispatcher
        try:
            if not isinstance(data, dict):
                raise ProtocolError("unsubscribe takes {event_types}", code="not_an_object")
            dispatcher.unsubscribe(conn, dispatcher.check_types(data.get("event_types")))
        except ProtocolError as exc:
            return _error(exc)
        return {"subscribed_to": dispatcher.subscribed_to(conn)}

    async def _resume(self, conn: SocketIOConnection, last_event_id: Any) -> dict[str, Any]:
        return (await self.hub.dispatcher.resume(conn, last_event_id)).message()

    async def _resume_task(self, conn: SocketIOConnection, last_event_id: Any) -> None:
        # Live events are held since _activate; dispatcher.resume keeps holding them.
        try:
            info = await self._resume(conn, last_event_id)
        except ProtocolError as exc:
            conn.end_replay()
            conn.emit_now("error", {"code": exc.code, "message": exc.message})
            return
        conn.emit_now("resumed", info)

    async def shutdown(self) -> None:
        """Let queued events go out, then close each Engine.IO transport.

        Closing the transport, not sending a Socket.IO disconnect, is deliberate: clients
        treat a server disconnect as final, but reconnect (to another instance, resuming
        with ``auth.last_event_id``) after a lost transport."""
        conns = list(self.connections.values())
        if conns:
            await asyncio.wait([asyncio.create_task(c.drained.wait()) for c in conns],
                               timeout=self.hub.settings.shutdown_timeout_s)
        for conn in conns:
            await self._close_transport(conn.eio_sid)


def _error(exc: ProtocolError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {}
    if "HTTP_AUTHORIZATION" in environ:
        headers["authorization"] = environ["HTTP_AUTHORIZATION"]
    if "HTTP_COOKIE" in environ:
        headers["cookie"] = environ["HTTP_COOKIE"]
    return headers
