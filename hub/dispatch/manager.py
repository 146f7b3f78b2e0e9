"""What hub adds to python-socketio's client managers.

python-socketio's ``AsyncManager.emit`` encodes a packet once but then starts one task per
recipient and awaits them all; with thousands of sockets that is most of the cost of a
broadcast. Here an emit without callback puts the one encoded Engine.IO packet straight
into each socket's send queue (the queue its single writer drains), without awaiting.
"""

from __future__ import annotations

from typing import Any

from engineio import packet as eio_packet
from socketio import packet as sio_packet


def queue_eio_packet(server: Any, eio_sid: str, pkt: eio_packet.Packet) -> int | None:
    """Queue ``pkt`` on the Engine.IO socket; return its queue length, or None if it is gone."""
    sock = server.eio.sockets.get(eio_sid)
    if sock is None or sock.closed or sock.closing:
        return None
    if sock.upgrading:
        # During the polling→websocket upgrade engine.io parks packets in a backlog that it
        # flushes onto the queue once the upgrade completes.
        sock.packet_backlog.append(pkt)
        return len(sock.packet_backlog)
    sock.queue.put_nowait(pkt)
    return int(sock.queue.qsize())


class FastEmitMixin:
    """For ``AsyncManager``: local emits without per-recipient tasks."""

    server: Any

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        if callback is not None or kwargs:
            # Acks need a packet per recipient and pub/sub managers use kwargs to route:
            # python-socketio's own path handles both.
            await super().emit(  # type: ignore[misc]
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback,
                to=to, **kwargs,
            )
            return
        local_emit(self, event, data, namespace, to or room, skip_sid)


def local_emit(manager: Any, event: str, data: Any, namespace: str, room: Any,
               skip_sid: Any) -> None:
    """Emit to this instance's sockets in ``room``: one encoding, queued on each socket."""
    if namespace not in manager.rooms:
        return
    if isinstance(data, tuple):
        args = list(data)
    elif data is not None:
        args = [data]
    else:
        args = []
    skip = set(skip_sid) if isinstance(skip_sid, list) else {skip_sid}
    server = manager.server
    pkt = server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args])
    encoded = pkt.encode()
    parts = encoded if isinstance(encoded, list) else [encoded]
    eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in parts]
    for sid, eio_sid in manager.get_participants(namespace, room):
        if sid in skip:
            continue
        for p in eio_pkts:
            queue_eio_packet(server, eio_sid, p)


class ConnectHookMixin:
    """Calls ``on_connected(sid)`` once python-socketio has queued a client's CONNECT packet.

    The ``connect`` event handler runs before that packet is sent; anything queued for the
    client from inside the handler would reach it before it knows it is connected, and be
    dropped. The transport therefore starts delivery (and any resume) from this hook."""

    on_connected: Any = None

    async def connect(self, sid: str, namespace: str) -> Any:
        result = await super().connect(sid, namespace)  # type: ignore[misc]
        if self.on_connected is not None and namespace == "/":
            self.on_connected(sid)
        return result
