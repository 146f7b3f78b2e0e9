"""Writing pre-encoded WebSocket frames straight to a connection's transport.

A server-to-client frame is not masked, so an event's frame is the same bytes for every
recipient: it is built once per instance and each delivery is one ``transport.write``.
Going through ASGI instead costs a task wake-up, Starlette's and uvicorn's send path and a
frame encoding per recipient — most of a broadcast's CPU.

This reaches into uvicorn's ``websockets-sansio`` protocol (the one ``hub serve``
configures), found from the raw ASGI ``send`` callable. Under any other server or
protocol, or behind middleware that wraps ``send``, :func:`frame_sink` returns None and
the connection uses plain ASGI sends. Whole frames only ever go onto the transport, so they
interleave safely with the protocol's own pings and close frames.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Mapping
from typing import Any

SEND_KEY = "hub.raw_send"  # where HubApp leaves the server's own send callable in the scope


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed text frame (RFC 6455 section 5.2)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


class FrameSink:
    """The transport of one uvicorn WebSocket connection, for whole pre-encoded frames."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def ready(self) -> bool:
        """True when a frame written now goes out without queueing behind backpressure."""
        return bool(self._protocol.writable.is_set()) and not self.closed

    @property
    def closed(self) -> bool:
        return bool(self._transport.is_closing() or self._protocol.close_sent)

    def write(self, frame: bytes) -> None:
        self._transport.write(frame)

    async def wait_ready(self) -> None:
        # uvicorn sets `writable` again when the transport drains or the connection is lost.
        await self._protocol.writable.wait()


async def write_queued(sink: FrameSink, outbox: deque[Any]) -> None:
    """Write queued frames (bytes) in order as the transport takes them, waiting out its
    backpressure; drop them if the connection is gone. Frames stay queued until written,
    so a direct write (which requires an empty queue) can never overtake one."""
    while outbox:
        if sink.closed:
            outbox.clear()
            return
        if not sink.ready():
            await sink.wait_ready()
            continue
        while outbox and sink.ready():
            sink.write(outbox.popleft())


def frame_sink(scope: Mapping[str, Any]) -> FrameSink | None:
    send = scope.get(SEND_KEY)
    protocol: Any = getattr(send, "__self__", None)
    if protocol is None or type(protocol).__name__ != "WebSocketsSansIOProtocol":
        return None
    if not all(hasattr(protocol, name) for name in ("transport", "writable", "close_sent")):
        return None  # a uvicorn release that changed its internals: use ASGI
    if getattr(protocol.config, "ws_per_message_deflate", False):
        return None  # keep what was negotiated exact: compressed connections use ASGI
    return FrameSink(protocol)
