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

from typing import Any

from engineio import packet as eio_packet

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
