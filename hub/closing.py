"""A close that cannot hang: ``transport.close()`` bounded by an abort.

asyncio's ``close()`` waits until the write buffer is flushed before it lets the socket go.
A peer that stops reading never lets the buffer drain, so a "closed" connection would keep
its descriptor, its protocol, its connection-limit slot and whatever the application still
holds for it for as long as the peer keeps the TCP connection up (a keepalive timeout, a
4008 slow-consumer close and a refused request all ended that way).

:class:`ClosingTransport` wraps a transport; its ``close()`` closes as usual and, when data
is still buffered, aborts the transport (RST, buffer dropped) ``grace`` seconds later if the
peer has not taken it by then. Everything else is the wrapped transport's; the hot
``write`` is the wrapped transport's own bound method, so writing through the wrapper costs
nothing. Used by hub's uvicorn protocols (hub._compat.uvicorn_protocols) for HTTP and
WebSocket alike.
"""

from __future__ import annotations

import asyncio
from typing import Any


class ClosingTransport(asyncio.Transport):
    """``transport`` whose ``close()`` turns into ``abort()`` after ``grace`` seconds."""

    def __init__(self, transport: asyncio.Transport, grace: float) -> None:
        super().__init__()
        self.inner = transport
        self.grace = grace
        self._abort_timer: asyncio.TimerHandle | None = None
        # The per-frame hot path goes straight to the real transport.
        self.write = transport.write  # type: ignore[method-assign]
        self.is_closing = transport.is_closing  # type: ignore[method-assign]

    def close(self) -> None:
        inner = self.inner
        inner.close()
        if self._abort_timer is None and inner.get_write_buffer_size() > 0:
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(self.grace, inner.abort)

    def close_now(self) -> None:
        """Close, and abort at once if anything is still buffered (a refused request)."""
        if self.inner.get_write_buffer_size() > 0:
            self.inner.abort()
        else:
            self.inner.close()

    def lost(self) -> None:
        """The connection is gone (call from ``connection_lost``): drop the timer."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    # -- the rest is the wrapped transport's ----------------------------------------------
    def abort(self) -> None:
        self.lost()
        self.inner.abort()

    def writelines(self, list_of_data: Any) -> None:
        self.inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()


def closing_transport(transport: asyncio.Transport, grace: float) -> ClosingTransport:
    """``transport`` wrapped once (an upgraded connection keeps its HTTP wrapper)."""
    if isinstance(transport, ClosingTransport):
        return transport
    return ClosingTransport(transport, grace)
