"""python-socketio's client managers as hub runs them, on the Socket.IO side: a backend
knows nothing of them. :func:`manager_for` builds the one for an instance: in-process, or
python-socketio's Redis manager on the backend's Redis client when there is one.

python-socketio's ``AsyncManager.emit`` encodes a packet once but then starts one task per
recipient and awaits them all; with thousands of sockets that is most of the cost of a
broadcast. Here an emit without callback puts the one encoded Engine.IO packet straight
into each socket's send queue (the queue its single writer drains), without awaiting.

Emits that carry ``data.tenant_id`` (from hub's code or from an external python-socketio
process through a write-only ``AsyncRedisManager``) reach only the sockets whose
principal may see that tenant, as hub's own events do. The server answers that question
with ``server.may_see(sid, tenant)``; emits with a callback or binary data, which take
python-socketio's own per-recipient path, are refused when they carry a tenant.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import socketio
from engineio import packet as eio_packet
from redis import asyncio as aioredis
from socketio import packet as sio_packet

from hub._compat import engineio as eio_compat
from hub.backoff import Backoff
from hub.dispatch.redis import subscribe

log = logging.getLogger("hub.socketio")


def queue_eio_packet(server: Any, eio_sid: str, pkt: eio_packet.Packet) -> int | None:
    """Queue ``pkt`` on the Engine.IO socket; return its queue length, or None if it is gone.
    Mid-upgrade too: the queue is drained in order by whichever transport carries it."""
    return eio_compat.queue_packet(server.eio, eio_sid, pkt)


def emit_tenant(data: Any) -> str | None:
    """The tenant an emit's payload belongs to: ``data.tenant_id`` of an envelope like
    hub's own (``{"type", "data": {...}}``), or ``tenant_id`` of a bare data object."""
    first = data[0] if isinstance(data, tuple | list) and data else data
    if not isinstance(first, dict):
        return None
    inner = first.get("data")
    tenant = inner.get("tenant_id") if isinstance(inner, dict) else None
    if tenant is None:
        tenant = first.get("tenant_id")
    return str(tenant) if tenant is not None else None


def refuse_tenant_emit(event: Any, data: Any) -> bool:
    """Whether an emit on python-socketio's own path must be dropped: it cannot be
    filtered per recipient, so one that carries a tenant is refused (and logged)."""
    if emit_tenant(data) is None:
        return False
    log.warning("dropped Socket.IO emit %r with a tenant_id and a callback or binary data: "
                "tenant-scoped emits must be plain JSON without acks", event)
    return True


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
            if callback is not None and refuse_tenant_emit(event, data):
                return
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
    tenant = emit_tenant(data)
    may_see = getattr(server, "may_see", None)
    pkt = server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args])
    encoded = pkt.encode()
    parts = encoded if isinstance(encoded, list) else [encoded]
    eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in parts]
    for sid, eio_sid in manager.get_participants(namespace, room):
        if sid in skip:
            continue
        if tenant is not None and (may_see is None or not may_see(sid, tenant)):
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


class MemoryManager(ConnectHookMixin, FastEmitMixin, socketio.AsyncManager):  # type: ignore[misc]
    """python-socketio's in-process manager with hub's encode-once emit."""


class HubRedisManager(ConnectHookMixin, socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's Redis manager on hub's Redis client, with the encode-once emit."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        super().__init__(channel=channel)
        self._client = client

    def _redis_connect(self) -> None:
        # python-socketio's publish path calls this (again after a failed publish): hub's
        # client, which reconnects by itself.
        self.redis = self._client
        self.connected = True

    async def _listen(self) -> Any:
        """The channel's messages, on a PubSub of hub's client: a new one after a lost
        connection (python-socketio keeps its one, but a Redis Cluster's stays on the node
        of its first SUBSCRIBE, which a failover may have taken away for good), on hub's
        backoff (python-socketio's doubles up to 60 s between attempts)."""
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            pubsub: Any = None
            try:
                self.pubsub = pubsub = await subscribe(self._client, self.channel)
                backoff.reset()
                async for message in pubsub.listen():
                    # The host's client may decode responses: the channel, str or bytes.
                    if (message.get("type") == "message"
                            and _str(message["channel"]) == self.channel):
                        yield message["data"]
            except Exception as exc:  # Redis down or the connection lost: subscribe again
                log.warning("Socket.IO channel %s: %s; subscribing again", self.channel, exc)
            finally:
                if pubsub is not None:
                    await pubsub.aclose()
            await asyncio.sleep(backoff.next_delay())

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        if message.get("callback") is not None or message.get("binary"):
            if not refuse_tenant_emit(message.get("event"), message.get("data")):
                await super()._handle_emit(message)
            return
        data = message["data"]
        if isinstance(data, list):
            data = data[0] if len(data) == 1 else tuple(data)
        local_emit(
            self,
            message["event"], data, message.get("namespace") or "/",
            message.get("room"), message.get("skip_sid"),
        )


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def manager_for(redis: Any, channel: str) -> Any:
    """The manager of an instance whose backend uses ``redis`` (None: in-process)."""
    if redis is None:
        return MemoryManager()
    return HubRedisManager(redis, channel)


async def close_manager(manager: Any) -> None:
    """Stop a Redis manager's listener and release its PubSub (before the client closes)."""
    thread = getattr(manager, "thread", None)
    if thread is not None:
        thread.cancel()
        await asyncio.gather(thread, return_exceptions=True)
    pubsub: Any = getattr(manager, "pubsub", None)
    if pubsub is not None:
        await pubsub.aclose()
