"""python-engineio's server-side socket: its send queue and its upgrade state.

Public API is used where it exists (``AsyncServer.transport(sid)``, ``send_packet``,
``reason``). What has none, and hub needs for a synchronous encode-once fan-out:
- ``AsyncServer.sockets`` maps an Engine.IO sid to its ``AsyncSocket``;
- the socket's ``queue`` is the ``asyncio.Queue`` its single writer (the pending GET of
  long-polling, or the WebSocket writer task) drains, in order, whatever the transport:
  ``AsyncSocket.send`` does nothing but ``queue.put`` after its ping check, and packets
  queued during an upgrade are carried by whichever transport drains the queue next;
- ``connected``, ``upgrading``, ``upgraded``, ``closing`` and ``closed`` are its state;
- a ``None`` on the queue ends a pending long-polling GET.
(asserted by tests/test_compat.py)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import engineio
from engineio import exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from hub._compat.lean import LeanQueue

NOOP = eio_packet.Packet(eio_packet.NOOP)


def socket(server: Any, eio_sid: str) -> Any | None:
    """The live Engine.IO socket of ``eio_sid`` on ``server`` (an engineio.AsyncServer)."""
    return server.sockets.get(eio_sid)


def sessions(server: Any) -> int:
    return len(server.sockets)


def queue_packet(server: Any, eio_sid: str, pkt: eio_packet.Packet) -> int | None:
    """Queue ``pkt`` for the client without awaiting (``send_packet`` is a coroutine, one
    task per recipient is what encode-once fan-out avoids); return the queue length, or
    None if the socket is gone. During an upgrade the packet waits on the same queue and
    goes out over polling or the new WebSocket, in order either way."""
    sock = server.sockets.get(eio_sid)
    if sock is None or sock.closed or sock.closing:
        return None
    sock.queue.put_nowait(pkt)
    return int(sock.queue.qsize())


def queue_length(sock: Any) -> int:
    return int(sock.queue.qsize())


async def sent_everything(sock: Any) -> None:
    """Wait until engine.io's writer has taken every packet queued so far."""
    await sock.queue.join()


def drop_queued(sock: Any) -> int:
    """Discard what waits in the socket's queue (it is going away); return how many."""
    dropped = 0
    while not sock.queue.empty():
        sock.queue.get_nowait()
        sock.queue.task_done()
        dropped += 1
    return dropped


def is_connected(sock: Any) -> bool:
    return bool(sock.connected)


def upgrade_in_progress(sock: Any) -> bool:
    """Between the client's ``2probe`` and its ``5`` (UPGRADE) on a new WebSocket."""
    return bool(sock.upgrading) and not bool(sock.upgraded)


def on_websocket(server: Any, eio_sid: str) -> bool:
    """engine.io serves this socket over a WebSocket (from the start, or upgraded)."""
    try:
        return bool(server.transport(eio_sid) == "websocket")
    except KeyError:
        return False


def is_closing(sock: Any) -> bool:
    return bool(sock.closed or sock.closing)


def end_poll(sock: Any) -> None:
    """Answer a pending long-polling GET with a NOOP (``6``), as engine.io itself answers
    a poll it will not fill."""
    sock.queue.put_nowait(NOOP)


async def close_now(server: Any, sock: Any) -> None:
    """Close without waiting for the queue to be sent (a stalled client never takes it),
    and forget the session at once, as ``AsyncServer.disconnect`` does (engine.io would
    otherwise keep a closed socket until the client's next request or its service task's
    next round)."""
    await sock.close(wait=False, reason=server.reason.SERVER_DISCONNECT)
    if sock.closed and server.sockets.get(sock.sid) is sock:
        del server.sockets[sock.sid]


# -- memory per session (README "Performance") -------------------------------------------
# python-engineio spends about 18 KB on an idle WebSocket session: an asyncio.Queue, a
# writer task and a reader that starts a task per read (both under asyncio.wait_for, which
# wraps each wait in one more task), a ping task per ping interval, and an environ whose
# body reader is a class defined per request. LeanEngineIOServer keeps the same protocol
# with: hub's LeanQueue; a socket class (HubSocket) whose WebSocket handler reads in the
# request's own task and starts a writer only while packets wait; a timer for each ping;
# and no body reader on a WebSocket request. What each relies on is asserted by
# tests/test_compat.py.


class _NoBody:
    """``wsgi.input`` of a WebSocket request (engine.io reads a body only from a POST)."""

    async def read(self, length: int | None = None) -> bytes:
        return b""


_NO_BODY = _NoBody()


class HubSocket(AsyncSocket):  # type: ignore[misc]
    """engine.io's socket with a lean WebSocket handler and ping timer (same packets,
    same order, same close sequence)."""

    def schedule_ping(self) -> None:
        # engine.io: a background task that sleeps ping_interval, then sends a PING.
        if self.last_ping:  # type: ignore[has-type]
            self.last_ping = None
            asyncio.get_running_loop().call_later(self.server.ping_interval, self._ping_due)

    def _ping_due(self) -> None:
        if not self.closing and not self.closed:
            self.last_ping = time.time()  # type: ignore[assignment]
            self.queue.put_nowait(eio_packet.Packet(eio_packet.PING))

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        was_closed = self.closed
        await super().close(wait=wait, abort=abort, reason=reason)
        if self.closed and not was_closed and getattr(self, "_hub_ws", None) is not None:
            # engine.io's writer timed out on an idle queue to end the WebSocket of a
            # closed session; this one ends it at once (after what is queued).
            self.queue.put_nowait(None)

    async def _websocket_handler(self, ws: Any) -> Any:
        server = self.server
        limit = server.max_http_buffer_size

        async def websocket_wait() -> Any:
            data = await ws.wait()
            if data and len(data) > limit:
                raise ValueError("packet is too large")
            return data

        if self.connected:  # type: ignore[has-type]
            # An upgrade: the same steps as engine.io's handler.
            self.upgrading = True
            try:
                pkt = await websocket_wait()
            except OSError:
                return None
            decoded = eio_packet.Packet(encoded_packet=pkt)
            if decoded.packet_type != eio_packet.PING or decoded.data != "probe":
                self.upgrading = False
                return None
            await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
            await self.queue.put(eio_packet.Packet(eio_packet.NOOP))  # end poll
            try:
                pkt = await websocket_wait()
            except OSError:
                self.upgrading = False
                return None
            decoded = eio_packet.Packet(encoded_packet=pkt)
            if decoded.packet_type != eio_packet.UPGRADE:
                self.upgraded = False
                self.upgrading = False
                return None
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True
        self._hub_ws = ws
        self._hub_writer: asyncio.Task[None] | None = None
        queue: LeanQueue = self.queue
        queue.on_put = self._start_writer
        self._start_writer()
        while True:
            try:
                p = await websocket_wait()
            except Exception:  # the client went away, or sent too much
                break
            if p is None:
                break
            try:
                await self.receive(eio_packet.Packet(encoded_packet=p))
            except exceptions.UnknownPacketError:
                pass
            except exceptions.SocketIsClosedError:
                break
            except Exception:
                server.logger.exception("Unknown receive error")
        queue.put_nowait(None)  # the writer sends what is queued, then closes
        writer = self._hub_writer
        if writer is not None and not writer.done():
            await asyncio.wait((writer,))
        queue.on_put = None
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)
        return None

    def _start_writer(self) -> None:
        writer = self._hub_writer
        if (writer is None or writer.done()) and not self.queue.empty():
            self._hub_writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        # engine.io's writer, run only while packets wait: each batch in order; None
        # (the end) or a failed send closes the WebSocket.
        try:
            await self._write_queued()
        finally:
            if self._hub_writer is asyncio.current_task():
                self._hub_writer = None  # a finished task is ~0.7 KB kept for nothing

    async def _write_queued(self) -> None:
        queue: LeanQueue = self.queue
        ws = self._hub_ws
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is None:
                break
            try:
                await ws.send(pkt.encode())
            except Exception:
                break
        else:
            return
        queue.on_put = None
        await ws.close()


class _Sockets(dict[str, Any]):
    """``AsyncServer.sockets``: each new engine.io socket becomes a HubSocket as it is
    registered (engine.io does ``self.sockets[sid] = AsyncSocket(self, sid)`` before it
    uses it, and has no hook to choose the class)."""

    def __setitem__(self, sid: str, sock: Any) -> None:
        if type(sock) is AsyncSocket:
            sock.__class__ = HubSocket
        super().__setitem__(sid, sock)


class LeanEngineIOServer(engineio.AsyncServer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sockets = _Sockets(self.sockets)  # type: ignore[has-type]
        drivers: dict[str, Any] = self._async  # type: ignore[has-type]
        translate = drivers["translate_request"]

        async def translate_request(scope: Any, receive: Any, send: Any) -> Any:
            environ = await translate(scope, receive, send)
            if scope.get("type") == "websocket":
                environ["wsgi.input"] = _NO_BODY  # drops a class object made per request
            return environ

        self._async = {**drivers, "translate_request": translate_request}

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return super().create_queue(*args, **kwargs)
        return LeanQueue()
