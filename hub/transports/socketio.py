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
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
import socketio
from engineio import packet as eio_packet

from hub._compat import engineio as eio_compat
from hub.auth import AuthError, Principal, token_from_headers
from hub.connection import (
    Outbox,
    Path,
    Services,
    Subscriber,
    TokenLifetime,
    count_slow,
)
from hub.consumers import Record, unbind_after_failed_resume
from hub.dispatch.filters import EventFilter, parse_filter
from hub.errors import CloseCode, ErrorCode, ProtocolError
from hub.events import Event
from hub.limits import TokenBucket
from hub.tasks import TaskSet
from hub.transports.frames import FrameSink, frame_sink, text_frame
from hub.transports.sio_manager import queue_eio_packet

log = logging.getLogger("hub.socketio")
_QUEUED = Path.QUEUED
NAMESPACE = "/"
SINK_KEY = "hub.sink"  # the FrameSink of a WebSocket request, left in its ASGI scope
UNSUPPORTED_VERSION = (
    "unsupported Engine.IO protocol version: hub speaks Engine.IO 4, i.e. socket.io-client "
    "3.x and 4.x (python-socketio 5.x); socket.io-client 2.x (EIO=3) is not supported")
UNSUPPORTED_VERSION_REASON = (  # a close reason holds at most 123 bytes
    "unsupported Engine.IO version: use socket.io-client 3.x or 4.x (EIO=4); 2.x (EIO=3) "
    "is not supported")


def event_text(event: Event) -> str:
    """The Socket.IO EVENT packet for namespace ``/``: ``2["<type>",<envelope>]``."""
    text: str = event.encoded("sio", _encode_text)
    return text


def event_packet(event: Event) -> eio_packet.Packet:
    """The Engine.IO MESSAGE packet carrying :func:`event_text`, built once per event."""
    pkt: eio_packet.Packet = event.encoded("sio_packet", _encode_packet)
    return pkt


def event_frame(event: Event) -> bytes:
    """The Engine.IO message carrying :func:`event_text` as a WebSocket frame."""
    frame: bytes = event.encoded("sio_frame", _encode_frame)
    return frame


def _encode_text(event: Event) -> str:
    return '2["' + event.type + '",' + event.text + "]"


def _encode_packet(event: Event) -> eio_packet.Packet:
    return eio_packet.Packet(eio_packet.MESSAGE, event_text(event))


def _encode_frame(event: Event) -> bytes:
    return text_frame(("4" + event_text(event)).encode())


class SocketIOConnection(Subscriber):
    """A Socket.IO socket as the dispatcher sees it: the connection core (hub.connection)
    with Socket.IO's packets.

    Over long-polling (Path.QUEUED), events go through engine.io's queue. Once the socket
    is on a WebSocket served by uvicorn, they take the same path as ``/ws/events``: the
    event's Engine.IO frame, built once, written straight to the transport, with the
    bounded outbox and its one writer for backpressure. The switch (Path.SWITCHING) waits
    until engine.io has sent what it queued (the CONNECT packet, or what was pending at the
    upgrade), so events never overtake it."""

    transport = "socketio"

    def __init__(self, transport: SocketIOTransport, sid: str, eio_sid: str,
                 principal: Principal) -> None:
        super().__init__(principal)
        self.sid = sid
        self.eio_sid = eio_sid
        self._transport = transport
        self._server = transport.sio
        self._limit = transport.hub.settings.outbox_limit
        self.lifetime: TokenLifetime | None = None
        self.outbox = Outbox(self._limit, path=Path.QUEUED)
        self.hold_limit = self._limit

    @property
    def kicked(self) -> bool:
        """Being disconnected by the server: it takes nothing more."""
        return not self.outbox.open

    # -- room for a replay (hub.connection.Subscriber) -----------------------------------
    def replay_room(self) -> int:
        if self.kicked:
            return 0
        if self.outbox.path is Path.QUEUED:  # through engine.io's queue
            sock = self._server.eio.sockets.get(self.eio_sid)
            return self._limit - (sock.queue.qsize() if sock is not None else 0)
        return self._limit - self.queued

    async def wait_room(self) -> None:
        if self.outbox.path is Path.QUEUED:
            sock = self._server.eio.sockets.get(self.eio_sid)
            if sock is not None:
                await sock.queue.join()
            return
        await self.outbox.wait_drained()

    @property
    def closed(self) -> bool:
        return self.kicked or super().closed

    # -- sending ------------------------------------------------------------------------
    def _send(self, event: Event, replay: bool = False) -> None:
        outbox = self.outbox
        if outbox.path is _QUEUED and not self._try_attach():
            # One packet object per event per instance, shared by all its recipients.
            self._queue(event_packet(event), bounded=not replay)
            return
        if not outbox.put(event_frame(event), not replay):
            self._transport.kick_slow(self)

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        """Send a hub-originated Socket.IO event (``resumed``, ``history_truncated``…) in
        order with the events around it."""
        text = "2" + orjson.dumps([name, data]).decode()
        if self.outbox.path is Path.QUEUED and not self._try_attach():
            self._queue(eio_packet.Packet(eio_packet.MESSAGE, text))
            return
        self._put(text_frame(("4" + text).encode()), bounded=False)

    def _queue(self, pkt: eio_packet.Packet, bounded: bool = False) -> None:
        """Through engine.io's queue; only live events count against the limit."""
        if self.kicked:
            return
        size = queue_eio_packet(self._server, self.eio_sid, pkt)
        # Live events up to the limit, anything else (replies, notices) up to twice it, as
        # the outbox of the direct path (hub.connection.Outbox.ceiling).
        if size is not None and size > (self._limit if bounded else 2 * self._limit):
            self._transport.kick_slow(self)

    def _put(self, frame: bytes, bounded: bool) -> None:
        if not self.outbox.put(frame, bounded):
            self._transport.kick_slow(self)

    # -- the direct path ----------------------------------------------------------------
    def _try_attach(self) -> bool:
        """Use the WebSocket this socket was upgraded to, once the upgrade is complete."""
        sink = self._transport.sink_for(self.eio_sid)
        if sink is None:
            return False
        self.attach(sink)
        return True

    def attach(self, sink: FrameSink) -> None:
        """QUEUED -> SWITCHING: frames queue in the outbox until engine.io's queue is out."""
        if self.outbox.sink is not None or self.kicked:
            return
        self._transport.hub.metrics.frame_path.labels(self.transport, "direct").inc()
        self.outbox.switch_over(sink, lambda: self._engineio_sent(sink))

    async def _engineio_sent(self, sink: FrameSink) -> None:
        sock = eio_compat.socket(self._server.eio, self.eio_sid)
        if sock is not None:
            # engine.io's writer first: what it queued before us must go out before us.
            await eio_compat.sent_everything(sock)
        await sink.wait_ready()
        # engine.io's writer, if it was waiting for the transport too, woke before us;
        # one turn of the loop lets it finish the frames it was holding.
        await asyncio.sleep(0)

    @property
    def queued(self) -> int:
        return self.outbox.queued

    @property
    def sink(self) -> FrameSink | None:
        sink = self.outbox.sink
        return sink if isinstance(sink, FrameSink) else None

    def close_after_error(self) -> None:
        """A send to it failed (see Dispatcher._deliver): close it."""
        self._transport.kick_failed(self)

    def rooms_changed(self, joined: set[str], left: set[str]) -> None:
        manager = self._server.manager
        for room in joined:
            manager.basic_enter_room(self.sid, NAMESPACE, room)
        for room in left:
            manager.basic_leave_room(self.sid, NAMESPACE, room)


class _Server(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server with hub's hooks on the Engine.IO events it handles
    (the overridden methods' signatures are asserted by tests/test_compat.py)."""

    hub_transport: SocketIOTransport

    def _engineio_server_class(self) -> Any:
        # engine.io with a lean idle session (hub._compat.engineio, README "Performance").
        return eio_compat.LeanEngineIOServer

    def may_see(self, sid: str, tenant: str) -> bool:
        """For hub's emit (hub.dispatch.manager): may socket ``sid`` see ``tenant``?"""
        conn = self.hub_transport.connections.get(sid)
        return conn is not None and conn.principal.may_see(tenant)

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        await super()._handle_eio_connect(eio_sid, environ)
        self.hub_transport.session_opened(eio_sid, environ)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if not self.hub_transport.allow_message(eio_sid):
            return
        try:
            await super()._handle_eio_message(eio_sid, data)
        except ValueError:
            # Not a Socket.IO packet (or one out of place): no traceback per packet, the
            # session ends; well-behaved clients never send one.
            log.info("closing an Engine.IO session that sent a malformed Socket.IO packet")
            self.hub_transport.close_session(eio_sid)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        await super()._handle_eio_disconnect(eio_sid, reason)
        self.hub_transport.session_closed(eio_sid)
        sock = eio_compat.socket(self.eio, eio_sid)
        if (sock is not None and not eio_compat.on_websocket(self.eio, eio_sid)
                and reason == self.eio.reason.CLIENT_DISCONNECT):
            # A client that leaves over long-polling (CLOSE sent by POST) may leave a GET
            # waiting on the queue (engine.io does not wake it), holding its disconnect
            # and the server's shutdown for up to a ping interval: answer it with a NOOP
            # (``6``), as engine.io answers a poll it will not fill. Only then: on a
            # WebSocket, or when the server closes (CLOSE still queued), it would not be
            # the last packet.
            eio_compat.end_poll(sock)


class SocketIOTransport:
    """python-socketio's AsyncServer wired to the dispatcher."""

    def __init__(self, hub: Services, manager: Any) -> None:
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
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            logger=False,
            engineio_logger=False,
        )
        self.sio.hub_transport = self
        manager.on_connected = self._activate
        self.connections: dict[str, SocketIOConnection] = {}
        self._by_eio: dict[str, SocketIOConnection] = {}
        self._tasks = TaskSet("socket.io")  # session closes, resumes, disconnects
        # Engine.IO sessions without a connected (authenticated) namespace yet: their
        # client address and the timer that ends them.
        self._unbound: dict[str, tuple[str, asyncio.TimerHandle]] = {}
        self._unbound_by_address: Counter[str] = Counter()
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: dict[str, tuple[Principal, list[str] | None, Any]] = {}
        self._filters: dict[str, EventFilter] = {}  # a pending connection's filter (auth)
        self._consumer_records: dict[str, Record] = {}  # a pending one's consumer (auth)
        self.sio.on("connect", self._connect)
        self.sio.on("disconnect", self._disconnect)
        self.sio.on("subscribe", self._subscribe)
        self.sio.on("unsubscribe", self._unsubscribe)
        self.sio.on("refresh", self._refresh)
        self.sio.on("ack", self._ack)
        self._engineio_app = socketio.ASGIApp(self.sio, socketio_path=None)
        # The WebSocket carrying each Engine.IO session that engine.io accepted on one
        # (from the start, or once an upgrade's UPGRADE packet arrived), for direct frame
        # writes and for aborting a close the peer does not read. Entries live exactly as
        # long as that WebSocket request.
        self._ws_sinks: dict[str, FrameSink] = {}
        self._sink_sid: dict[FrameSink, str] = {}

    # -- the ASGI entry point -----------------------------------------------------------
    async def asgi_app(self, scope: Any, receive: Any, send: Any) -> None:
        """python-socketio's ASGI app behind hub's checks: protocol version, the caps on
        sessions not yet authenticated, the polling body size; and the bookkeeping of the
        WebSocket each session is carried by."""
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self._engineio_app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sid = query.get("sid", [None])[0]
        if sid is None:
            if query.get("EIO") != ["4"]:
                await _refuse(scope, send, 400, CloseCode.POLICY_VIOLATION,
                              ErrorCode.UNSUPPORTED_PROTOCOL,
                              UNSUPPORTED_VERSION if kind == "http"
                              else UNSUPPORTED_VERSION_REASON)
                return
            refusal = self._admit(_address(scope))
            if refusal is not None:
                await _refuse(scope, send, 503, CloseCode.TRY_AGAIN_LATER,
                              ErrorCode.TOO_MANY_SESSIONS, refusal)
                return
        elif kind == "http" and scope.get("method") == "POST":
            length = _content_length(scope)
            if length is not None and length > self.settings.max_message_bytes:
                # engine.io would disconnect the session and never answer the request.
                await _refuse(scope, send, 413, CloseCode.MESSAGE_TOO_BIG,
                              ErrorCode.PAYLOAD_TOO_LARGE,
                              f"a polling request body may hold at most "
                              f"{self.settings.max_message_bytes} bytes")
                self.close_session(sid)
                return
        if kind != "websocket":
            await self._engineio_app(scope, receive, send)
            return
        sink = frame_sink(scope)
        if sink is None:
            await self._engineio_app(scope, receive, send)
            return
        scope[SINK_KEY] = sink
        if sid is not None:
            receive = self._watch_upgrade(sid, sink, receive)
        try:
            await self._engineio_app(scope, receive, send)
        finally:
            owner = self._sink_sid.pop(sink, None)
            if owner is not None and self._ws_sinks.get(owner) is sink:
                del self._ws_sinks[owner]

    def _watch_upgrade(self, sid: str, sink: FrameSink, receive: Any) -> Any:
        """``receive`` for an upgrade's WebSocket: when the client's UPGRADE packet (``5``)
        arrives for a session that engine.io is upgrading on this request, and no other
        WebSocket carries it, this one becomes its carrier. Nothing is kept for a request
        with an unknown, foreign or already upgraded sid."""
        async def watched() -> Any:
            message = await receive()
            if (message.get("type") == "websocket.receive" and message.get("text") == "5"
                    and sink not in self._sink_sid):
                sock = eio_compat.socket(self.sio.eio, sid)
                if (sock is not None and eio_compat.upgrade_in_progress(sock)
                        and sid not in self._ws_sinks):
                    self._carry(sid, sink)
            return message
        return watched

    def _carry(self, eio_sid: str, sink: FrameSink) -> None:
        self._ws_sinks[eio_sid] = sink
        self._sink_sid[sink] = eio_sid

    def sink_for(self, eio_sid: str) -> FrameSink | None:
        """The WebSocket carrying this session, once engine.io serves it there (at once for
        a WebSocket from the start, after the UPGRADE packet for an upgrade)."""
        sink = self._ws_sinks.get(eio_sid)
        if sink is None:
            return None
        sock = eio_compat.socket(self.sio.eio, eio_sid)
        if sock is None or eio_compat.upgrade_in_progress(sock) \
                or not eio_compat.on_websocket(self.sio.eio, eio_sid):
            return None
        return sink

    # -- Engine.IO sessions -------------------------------------------------------------
    @property
    def settings(self) -> Any:
        return self.hub.settings

    def _admit(self, address: str) -> str | None:
        """Whether a new Engine.IO session may open; the reason if not."""
        settings = self.settings
        if len(self._unbound) >= settings.socketio_unbound_limit:
            return "too many Socket.IO sessions waiting to authenticate; retry later"
        if self._unbound_by_address[address] >= settings.socketio_unbound_per_address:
            return "too many Socket.IO sessions from this address waiting to authenticate"
        if len(self._unbound) + self.hub.limits.total >= settings.max_connections:
            return "instance connection limit reached"
        return None

    def session_opened(self, eio_sid: str, environ: dict[str, Any]) -> None:
        """engine.io opened a session: it counts as unauthenticated until its namespace
        connects, and ends after HUB_SOCKETIO_CONNECT_TIMEOUT_S if it never does."""
        scope = environ.get("asgi.scope") or {}
        address = _address(scope)
        timer = asyncio.get_running_loop().call_later(
            self.settings.socketio_connect_timeout_s, self._connect_timed_out, eio_sid)
        self._unbound[eio_sid] = (address, timer)
        self._unbound_by_address[address] += 1
        sink = scope.get(SINK_KEY)
        if isinstance(sink, FrameSink):  # a WebSocket from the start
            self._carry(eio_sid, sink)

    def _bound(self, eio_sid: str) -> None:
        entry = self._unbound.pop(eio_sid, None)
        if entry is None:
            return
        address, timer = entry
        timer.cancel()
        self._unbound_by_address[address] -= 1
        if self._unbound_by_address[address] <= 0:
            del self._unbound_by_address[address]

    def _close_after_refusal(self, sid: str) -> None:
        """A refused CONNECT leaves nothing to wait for: end the Engine.IO session once
        the CONNECT_ERROR is out (within the close timeout), instead of holding it for
        the connect timeout."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        if eio_sid is not None:
            self._tasks.spawn(self._close_when_sent(eio_sid))

    async def _close_when_sent(self, eio_sid: str) -> None:
        await asyncio.sleep(0)  # python-socketio queues the CONNECT_ERROR after we raise
        sock = eio_compat.socket(self.sio.eio, eio_sid)
        if sock is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(eio_compat.sent_everything(sock),
                                   self.settings.close_timeout_s)
        await self._close_transport(eio_sid)

    def _connect_timed_out(self, eio_sid: str) -> None:
        if eio_sid in self._unbound:
            log.info("closing an Engine.IO session that did not connect in %.0f s",
                     self.settings.socketio_connect_timeout_s)
            self._bound(eio_sid)
            self.close_session(eio_sid)

    def session_closed(self, eio_sid: str) -> None:
        self._bound(eio_sid)
        self._buckets.pop(eio_sid, None)
        self._abort_later(eio_sid)

    def allow_message(self, eio_sid: str) -> bool:
        """The client message rate limit (HUB_CLIENT_RATE, HUB_CLIENT_BURST), as on
        ``/ws/events``: a session that exceeds it is closed."""
        bucket = self._buckets.get(eio_sid)
        if bucket is None:
            bucket = self._buckets[eio_sid] = TokenBucket(self.settings.client_rate,
                                                          self.settings.client_burst)
        if bucket.take():
            return True
        conn = self._by_eio.get(eio_sid)
        if conn is not None:
            if not conn.kicked:
                log.warning("disconnecting Socket.IO client %s (user %s): message rate limit "
                            "exceeded", conn.sid, conn.principal.user_id)
                conn.send_control("error", {"code": ErrorCode.RATE_LIMITED,
                                        "message": "message rate limit exceeded"})
                self._kick(conn)
        else:
            self.close_session(eio_sid)
        return False

    def close_session(self, eio_sid: str) -> None:
        """End an Engine.IO session now (and abort its WebSocket if the peer does not
        read the close)."""
        self._tasks.spawn(self._close_transport(eio_sid))

    def _abort_later(self, eio_sid: str) -> None:
        """A closing WebSocket whose peer stopped reading would hold its descriptor for
        ever (the close frame waits behind unread data): abort it after the close
        timeout."""
        sink = self._ws_sinks.get(eio_sid)
        conn = self._by_eio.get(eio_sid)
        if sink is None and conn is not None:
            sink = conn.sink
        if sink is not None and not sink.gone:
            asyncio.get_running_loop().call_later(self.settings.close_timeout_s,
                                                  _abort_if_open, sink)

    # -- connection lifecycle -----------------------------------------------------------
    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        hub = self.hub
        auth = auth if isinstance(auth, dict) else {}
        token = auth.get("token")
        if not isinstance(token, str) or not token:
            token = token_from_headers(_headers(environ))
        try:
            principal = await hub.verifier.verify_async(token)
        except AuthError as exc:
            hub.metrics.auth_failures.labels(exc.code).inc()
            self._close_after_refusal(sid)
            client = (environ.get("asgi.scope") or {}).get("client")  # REMOTE_ADDR is fixed
            hub.refusals.refuse("Socket.IO", client[0] if client else None, exc.code,
                                early_answer=False)
            raise socketio.exceptions.ConnectionRefusedError(
                ErrorCode.UNAUTHORIZED,
                {"code": CloseCode.UNAUTHORIZED, "reason": exc.code, "message": exc.message}
            ) from None
        types = None
        if "event_types" in auth:
            try:
                types = hub.dispatcher.check_types(auth["event_types"])
            except ProtocolError as exc:
                raise socketio.exceptions.ConnectionRefusedError(
                    exc.message, {"code": exc.code}) from None
        try:
            flt = parse_filter(auth.get("filter"))
        except ProtocolError as exc:
            raise socketio.exceptions.ConnectionRefusedError(
                exc.message, {"code": exc.code}) from None
        last_event_id = auth.get("last_event_id")
        record = None
        if auth.get("consumer") is not None:
            # A durable consumer: its cursor, read (or created) before the connect is
            # accepted, is where this connection resumes.
            try:
                record = await hub.consumers.register(principal, auth["consumer"],
                                                      last_event_id)
            except ProtocolError as exc:
                raise socketio.exceptions.ConnectionRefusedError(
                    exc.message, {"code": exc.code}) from None
            last_event_id = record.acked
        refusal = hub.limits.acquire(principal.user_id)
        if refusal is not None:
            self._close_after_refusal(sid)
            raise socketio.exceptions.ConnectionRefusedError(
                refusal, {"code": CloseCode.TRY_AGAIN_LATER})
        self._pending[sid] = (principal, types, last_event_id)
        if record is not None:
            self._consumer_records[sid] = record
        if flt is not None:
            self._filters[sid] = flt

    def _activate(self, sid: str) -> None:
        """Called once the client has been sent its CONNECT packet: start delivering."""
        pending = self._pending.pop(sid, None)
        if pending is None:
            return
        principal, types, last_event_id = pending
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        self._bound(eio_sid)
        conn = SocketIOConnection(self, sid, eio_sid, principal)
        conn.filter = self._filters.pop(sid, None)
        record = self._consumer_records.pop(sid, None)
        if record is not None:
            self.hub.consumers.attach(conn, record)
        conn._try_attach()  # connected over a WebSocket from the start (or upgraded already)
        self.connections[sid] = conn
        self._by_eio[eio_sid] = conn
        self.hub.metrics.connections.labels(conn.transport).inc()
        self.hub.dispatcher.add(conn, types)
        conn.send_control("connection_established", {
            "user_id": principal.user_id, "connection_id": sid,
            "instance_id": self.hub.settings.instance_id,
            "event_types": self.hub.dispatcher.subscribed_to(conn),
        })
        conn.lifetime = TokenLifetime(
            conn, leeway=self.hub.verifier.leeway,
            lead=self.hub.settings.token_expiring_lead_s,
            expire=lambda: self._expire(conn), notify=conn.send_control)
        revoked = self.hub.verifier.revoked
        if revoked is not None and revoked(principal):
            # Revoked between its CONNECT and now (after the check at connect).
            self.revoke(lambda p: p is principal)
            return
        if last_event_id is None:
            # Until its first message: it may be a subscribe that resumes.
            conn.hold_for_first_message(self.hub.settings.resume_hold_s)
        else:
            conn.begin_replay()  # hold live events until the replay is queued
            self._tasks.spawn(self._resume_task(conn, last_event_id))

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        pending = self._pending.pop(sid, None)
        self._filters.pop(sid, None)
        self._consumer_records.pop(sid, None)
        if pending is not None:
            self.hub.limits.release(pending[0].user_id)
            return
        conn = self.connections.pop(sid, None)
        if conn is None:
            return
        self._abort_later(conn.eio_sid)
        if self._by_eio.get(conn.eio_sid) is conn:
            del self._by_eio[conn.eio_sid]
        conn.outbox.abort()
        if conn.lifetime is not None:
            conn.lifetime.cancel()
        self.hub.dispatcher.remove(conn)
        self.hub.limits.release(conn.principal.user_id)
        self.hub.metrics.connections.labels(conn.transport).dec()

    def _expire(self, conn: SocketIOConnection) -> None:
        conn.send_control("token_expired", {"code": CloseCode.UNAUTHORIZED,
                                            "message": "token expired"})
        self._kick(conn)

    def revoke(self, covers: Callable[[Principal], bool]) -> int:
        """Disconnect the connections whose token is revoked, after a ``token_revoked``
        event."""
        closing = [c for c in self.connections.values() if covers(c.principal) and not c.kicked]
        for conn in closing:
            conn.send_control("token_revoked", {"code": CloseCode.UNAUTHORIZED,
                                                "message": "token revoked"})
            self._kick(conn)
        return len(closing)

    def kick_failed(self, conn: SocketIOConnection) -> None:
        self._kick(conn, drop_queue=True)

    def kick_slow(self, conn: SocketIOConnection) -> None:
        sock = eio_compat.socket(self.sio.eio, conn.eio_sid)
        dropped = conn.queued + (eio_compat.queue_length(sock) if sock is not None else 0)
        count_slow(self.hub.metrics, log, conn.transport, conn.sid, conn.principal.user_id,
                   dropped)
        self._kick(conn, drop_queue=True)

    def _kick(self, conn: SocketIOConnection, drop_queue: bool = False) -> None:
        if conn.kicked:
            return
        if not drop_queue:
            conn.outbox.close_after_flush()  # what is queued (a notice) still goes out
        else:
            conn.outbox.abort()
            sock = eio_compat.socket(self.sio.eio, conn.eio_sid)
            if sock is not None:
                eio_compat.drop_queued(sock)  # free the backlog now; the socket is going away
        self._tasks.spawn(self._disconnect_now(conn))

    async def _disconnect_now(self, conn: SocketIOConnection) -> None:
        # What is still queued (a token_expired notice) goes out first, within reason.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.outbox.wait_drained(),
                                   self.settings.close_timeout_s)
        await self.sio.disconnect(conn.sid)
        await self._close_transport(conn.eio_sid)

    async def _close_transport(self, eio_sid: str) -> None:
        """Close the Engine.IO socket without waiting for its queue to be sent: the writer
        of a slow or vanished client may never get there (engine.io's own disconnect would
        wait for ever). Its WebSocket, if the peer does not read the close, is aborted
        after the close timeout."""
        self._abort_later(eio_sid)
        sock = eio_compat.socket(self.sio.eio, eio_sid)
        if sock is not None and not eio_compat.is_closing(sock):
            await eio_compat.close_now(self.sio.eio, sock)

    # -- client events ------------------------------------------------------------------
    async def _subscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        conn = self.connections.get(sid)
        if conn is None:
            return _error(ProtocolError("not connected", code=ErrorCode.NOT_CONNECTED))
        dispatcher = self.hub.dispatcher
        try:
            payload = data if isinstance(data, dict) else {}
            if not isinstance(data, dict):
                raise ProtocolError("subscribe takes {event_types, last_event_id?}",
                                    code=ErrorCode.NOT_AN_OBJECT)
            types = dispatcher.check_types(payload.get("event_types"))
            flt = parse_filter(payload["filter"]) if "filter" in payload else conn.filter
            start = payload.get("last_event_id")
            consumer = payload.get("consumer")
            if consumer is not None:
                consumers = self.hub.consumers
                start = None
                if not consumers.check_bindable(conn, consumer):
                    record = await consumers.register(conn.principal, consumer,
                                                      payload.get("last_event_id"))
                    start = consumers.attach(conn, record)
            dispatcher.subscribe(conn, types)
            conn.filter = flt
            ack: dict[str, Any] = dispatcher.subscription_reply(conn, types)
            if conn.consumer is not None:
                ack["consumer"] = conn.consumer.describe()
            if start is not None:
                try:
                    result = await self._resume(conn, start)
                except ProtocolError:
                    if consumer is not None and unbind_after_failed_resume(conn) is not None:
                        raise ProtocolError(
                            f"the replay of consumer {consumer!r} failed; not bound to it, "
                            "subscribe again", code=ErrorCode.CONSUMER_UNAVAILABLE) from None
                    raise
                ack.update(replayed=result["replayed"], truncated=result["truncated"],
                           first_retained_id=result["first_retained_id"])
        except ProtocolError as exc:
            return _error(exc)
        finally:
            conn.first_message_seen()
        return ack

    async def _unsubscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        conn = self.connections.get(sid)
        if conn is None:
            return _error(ProtocolError("not connected", code=ErrorCode.NOT_CONNECTED))
        dispatcher = self.hub.dispatcher
        try:
            if not isinstance(data, dict):
                raise ProtocolError("unsubscribe takes {event_types}", code=ErrorCode.NOT_AN_OBJECT)
            types = dispatcher.check_types(data.get("event_types"))
            dispatcher.unsubscribe(conn, types)
        except ProtocolError as exc:
            return _error(exc)
        finally:
            conn.first_message_seen()
        return dispatcher.subscription_reply(conn, types)

    async def _refresh(self, sid: str, data: Any = None) -> dict[str, Any]:
        """``refresh`` with ``{token}`` (or the token as a string): the ack carries the new
        ``exp``, or an ``error`` and the old token (and its expiry) stands."""
        conn = self.connections.get(sid)
        if conn is None or conn.lifetime is None:
            return _error(ProtocolError("not connected", code=ErrorCode.NOT_CONNECTED))
        token = data.get("token") if isinstance(data, dict) else data
        try:
            conn.lifetime.refresh(self.hub.verifier, token)
        except AuthError as exc:
            self.hub.metrics.auth_failures.labels(exc.code).inc()
            return {"error": {"code": exc.code, "message": exc.message}}
        finally:
            conn.first_message_seen()
        return conn.lifetime.refreshed_message()

    async def _ack(self, sid: str, data: Any = None) -> dict[str, Any]:
        """``ack`` with ``{id}`` (or the id as a string): a durable consumer's cursor moves
        to it; the ack answers ``{consumer: {name, acked_id}}`` or an ``error``."""
        conn = self.connections.get(sid)
        if conn is None:
            return _error(ProtocolError("not connected", code=ErrorCode.NOT_CONNECTED))
        event_id = data.get("id") if isinstance(data, dict) else data
        try:
            cursor = self.hub.consumers.ack(conn, event_id)
        except ProtocolError as exc:
            return _error(exc)
        finally:
            conn.first_message_seen()
        return {"consumer": cursor.describe()}

    async def _resume(self, conn: SocketIOConnection, last_event_id: Any) -> dict[str, Any]:
        return (await self.hub.dispatcher.resume(conn, last_event_id)).message()

    async def _resume_task(self, conn: SocketIOConnection, last_event_id: Any) -> None:
        # Live events are held since _activate; dispatcher.resume keeps holding them.
        try:
            info = await self._resume(conn, last_event_id)
        except ProtocolError as exc:
            conn.end_replay()
            unbound = unbind_after_failed_resume(conn)
            if unbound is not None:
                conn.send_error(unbound)
            conn.send_error(exc)
            return
        conn.send_control("resumed", info)

    async def shutdown(self) -> None:
        """Let queued events go out, then close each Engine.IO transport.

        Closing the transport, not sending a Socket.IO disconnect, is deliberate: clients
        treat a server disconnect as final, but reconnect (to another instance, resuming
        with ``auth.last_event_id``) after a lost transport."""
        conns = list(self.connections.values())
        if conns:
            await asyncio.wait([asyncio.create_task(c.outbox.wait_drained()) for c in conns],
                               timeout=self.hub.settings.shutdown_timeout_s)
        for conn in conns:
            await self._close_transport(conn.eio_sid)


def _abort_if_open(sink: FrameSink) -> None:
    if not sink.gone:
        log.info("aborting a Socket.IO WebSocket whose peer did not read its close")
        sink.abort()


def _address(scope: Any) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(scope: Any, send: Any, status: int, close_code: int, code: str,
                  message: str) -> None:
    """Refuse a request before engine.io sees it: an HTTP error with a JSON body, or for
    a WebSocket an accept and a close whose reason says why (a close before the accept
    would reach the client as a bare 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": close_code,
                    "reason": message.encode()[:123].decode("utf-8", "ignore")})
        return
    body = orjson.dumps({"code": code, "message": message})
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if status == 413:
        headers.append((b"connection", b"close"))  # the unread body is not drained
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error(exc: ProtocolError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {}
    if "HTTP_AUTHORIZATION" in environ:
        headers["authorization"] = environ["HTTP_AUTHORIZATION"]
    if "HTTP_COOKIE" in environ:
        headers["cookie"] = environ["HTTP_COOKIE"]
    return headers
