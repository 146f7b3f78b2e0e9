"""Writing pre-encoded WebSocket frames straight to a connection's transport.

A server-to-client frame is not masked, so an event's frame is the same bytes for every
recipient: it is built once per instance and each delivery is one ``transport.write``.
Going through ASGI instead costs a task wake-up, Starlette's and uvicorn's send path and a
frame encoding per recipient — most of a broadcast's CPU.

This reaches into uvicorn's ``websockets-sansio`` protocol (the one ``hub serve``
configures), found from the raw ASGI ``send`` callable, through :mod:`hub._compat.uvicorn`
(whose assumptions tests/test_compat.py asserts). Under any other server or protocol, or
behind middleware that wraps ``send``, :func:`frame_sink` returns None and the connection
uses plain ASGI sends. Whole frames only ever go onto the transport, so they
interleave safely with the protocol's own pings and close frames.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from hub._compat import uvicorn as uvicorn_compat

SEND_KEY = "hub.raw_send"  # where HubApp leaves the server's own send callable in the scope
COALESCER_KEY = "hub.coalescer"  # and the instance's WriteCoalescer


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


class Sink(Protocol):
    """Where an outbox writes whole frames (hub.connection.Outbox): :class:`FrameSink` for a
    uvicorn WebSocket; any transport with flow control fits."""

    def ready(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    def write(self, frame: bytes) -> None: ...

    async def wait_ready(self) -> None: ...


class FrameSink:
    """The transport of one uvicorn WebSocket connection, for whole pre-encoded frames."""

    __slots__ = ("_coalescer", "_protocol", "_transport")

    def __init__(self, protocol: Any, coalescer: WriteCoalescer | None = None) -> None:
        self._protocol = protocol
        self._transport = protocol.transport
        self._coalescer = coalescer

    def ready(self) -> bool:
        """True when a frame written now goes out without queueing behind backpressure."""
        return uvicorn_compat.is_writable(self._protocol) and not self.closed

    @property
    def closed(self) -> bool:
        return uvicorn_compat.is_closed(self._protocol)

    @property
    def gone(self) -> bool:
        """The TCP connection has ended and its descriptor is released."""
        return uvicorn_compat.is_gone(self._protocol)

    def abort(self) -> None:
        """Drop the connection now, unread data and all (a peer that stopped reading)."""
        uvicorn_compat.abort(self._protocol)

    def write(self, frame: bytes) -> None:
        coalescer = self._coalescer
        batch = coalescer.batch if coalescer is not None else None
        if batch is None:
            self._transport.write(frame)
        else:
            batch.add(self, frame)

    def _write_many(self, frames: list[bytes]) -> None:
        if not self.closed:
            self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def wait_ready(self) -> None:
        # uvicorn sets `writable` again when the transport drains or the connection is lost.
        await self._protocol.writable.wait()


async def write_queued(sink: Sink, outbox: deque[Any]) -> None:
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
    """The sink of a WebSocket request, writing through the instance's coalescer (which
    HubApp leaves in the scope beside the raw send); None where direct writes are off."""
    protocol = uvicorn_compat.sansio_protocol(scope.get(SEND_KEY))
    if protocol is None:
        return None
    coalescer = scope.get(COALESCER_KEY)
    return FrameSink(protocol, coalescer if isinstance(coalescer, WriteCoalescer) else None)


class _Batch:
    """Frames written inside :meth:`WriteCoalescer.coalesced`, per sink, in order."""

    # Enough to make a burst cheap, few enough to bound the memory held (~300 bytes each)
    # and the delay of the first frames (about a microsecond of fan-out per frame).
    LIMIT = 20_000

    def __init__(self) -> None:
        self.frames: dict[FrameSink, list[bytes]] = {}
        self.count = 0

    def add(self, sink: FrameSink, frame: bytes) -> None:
        queued = self.frames.get(sink)
        if queued is None:
            self.frames[sink] = [frame]
        else:
            queued.append(frame)
        self.count += 1
        if self.count >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        frames, self.frames, self.count = self.frames, {}, 0
        for sink, queued in frames.items():
            sink._write_many(queued)


class WriteCoalescer:
    """One per hub instance (nothing module-global): the batch its sinks write into while
    a :meth:`coalesced` block runs."""

    __slots__ = ("batch",)

    def __init__(self) -> None:
        self.batch: _Batch | None = None

    @contextlib.contextmanager
    def coalesced(self) -> Iterator[None]:
        """Within this block (which must not await), frames written to each connection are
        joined and go out in one ``transport.write`` at its end: a batch of events read
        together costs each client one system call instead of one per event. Order per
        connection is kept; nothing else writes to a transport while no task switch
        happens."""
        if self.batch is not None:  # nested: the outer block flushes
            yield
            return
        self.batch = batch = _Batch()
        try:
            yield
        finally:
            self.batch = None
            batch.flush()
