"""uvicorn's ``websockets-sansio`` protocol, reached from the ASGI ``send`` callable.

Assumptions (asserted by tests/test_compat.py):
- ``send`` is the bound method ``WebSocketsSansIOProtocol.send``, so ``send.__self__`` is
  the protocol of the connection;
- the protocol has ``transport`` (an asyncio transport: ``write``, ``is_closing``,
  ``abort``), ``writable`` (an ``asyncio.Event``, or hub's ``LeanFlag`` in its place, see
  uvicorn_protocols.py; cleared while the transport pushes back
  and set again when it drains *or the connection is lost*), ``close_sent`` and
  ``disconnected`` (booleans) and ``config.ws_per_message_deflate``.
"""

from __future__ import annotations

from typing import Any

PROTOCOL_CLASS = "WebSocketsSansIOProtocol"
ATTRIBUTES = ("transport", "writable", "close_sent", "disconnected", "config")


def sansio_protocol(send: Any) -> Any | None:
    """The uvicorn protocol behind a raw ASGI ``send``; None under anything else (another
    server or protocol, or middleware that wrapped ``send``)."""
    protocol: Any = getattr(send, "__self__", None)
    if protocol is None or not any(  # uvicorn's protocol, or hub's subclass of it
            cls.__name__ == PROTOCOL_CLASS for cls in type(protocol).__mro__):
        return None
    if not all(hasattr(protocol, name) for name in ATTRIBUTES):
        return None  # a uvicorn release that changed its internals: use ASGI
    if getattr(protocol.config, "ws_per_message_deflate", False):
        return None  # keep what was negotiated exact: compressed connections use ASGI
    return protocol


def is_writable(protocol: Any) -> bool:
    return bool(protocol.writable.is_set())


def is_closed(protocol: Any) -> bool:
    return bool(protocol.transport.is_closing() or protocol.close_sent)


def is_gone(protocol: Any) -> bool:
    """uvicorn saw the TCP connection end (``connection_lost``): its descriptor is free.
    A transport that is merely closing still holds it while unread data waits."""
    return bool(protocol.disconnected)


def abort(protocol: Any) -> None:
    """Drop the connection now, discarding what its peer never read: frees the descriptor
    even when the peer stopped reading (uvicorn's close would wait for that flush)."""
    if not protocol.disconnected:
        protocol.transport.abort()


# -- HTTP responses (Server-Sent Events) -----------------------------------------------
# Assumed (tests/test_compat.py): the raw ASGI ``send`` of an HTTP request is the bound
# method ``RequestResponseCycle.send`` (httptools or h11), whose ``transport`` is the
# connection's asyncio transport and ``disconnected`` whether it is gone.
HTTP_CYCLE_CLASS = "RequestResponseCycle"


def http_transport(send: Any) -> Any | None:
    """The asyncio transport behind an HTTP request's raw ASGI ``send``; None under
    another server or behind middleware that wrapped ``send``."""
    cycle: Any = getattr(send, "__self__", None)
    if cycle is None or type(cycle).__name__ != HTTP_CYCLE_CLASS:
        return None
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(transport, "abort") or not hasattr(cycle,
                                                                            "disconnected"):
        return None
    return transport


def abort_http(send: Any) -> bool:
    """Drop an HTTP response's connection now (a slow Server-Sent Events client): what it
    never read is discarded and uvicorn sees the connection lost. False where it cannot."""
    transport = http_transport(send)
    if transport is None:
        return False
    transport.abort()
    return True
