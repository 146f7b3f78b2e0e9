"""A minimal plain-WebSocket client on a bare asyncio Protocol, for tests that need
thousands of connections in one process (a storm) or a peer that stops reading.

It speaks just enough RFC 6455 for ``/ws/events``: the client handshake, masked text
frames out, unmasked server frames in (text, close; pings are answered). Messages are
handed to ``on_message`` as parsed JSON, in order.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import orjson

from tests.helpers import client_frame


class RawClient(asyncio.Protocol):
    def __init__(self, on_message: Callable[[Any], None] | None = None,
                 raw: bool = False) -> None:
        self.messages: list[Any] = []
        self.on_message = on_message or self.messages.append
        self._raw = raw  # hand over payloads as bytes (Engine.IO packets are not JSON)
        self._buf = b""
        self._handshaken = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def connect(cls, port: int, token: str, *, path: str = "/ws/events",
                      headers: dict[str, str] | None = None,
                      on_message: Callable[[Any], None] | None = None,
                      rcvbuf: int | None = None, raw: bool = False) -> RawClient:
        loop = asyncio.get_running_loop()
        sock = None
        if rcvbuf is not None:
            # Set before connecting, so the window the server sees stays small.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            _, client = await loop.create_connection(lambda: cls(on_message, raw), sock=sock)
        else:
            _, client = await loop.create_connection(lambda: cls(on_message, raw),
                                                     "127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        assert client.transport is not None
        client.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
            .encode())
        await client.opened
        return client

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        if not self._handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status, buf = buf[:end], buf[end + 4:]
            if not status.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self._handshaken = True
            self.opened.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if size - pos < head + length:
                break
            payload = buf[pos + head:pos + head + length]
            pos += head + length
            if opcode == 0x1:
                self.on_message(payload if self._raw else orjson.loads(payload))
            elif opcode == 0x9:  # ping → pong (masked, as a client must)
                self._write(_masked(0x8A, payload))
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                if not self.closed.done():
                    self.closed.set_result(code)
                if self.transport is not None:
                    self.transport.close()
        self._buf = buf[pos:]

    # -- sending ------------------------------------------------------------------------
    def send_json(self, message: Any) -> None:
        self.send_text(orjson.dumps(message).decode())

    def send_text(self, text: str) -> None:
        self._write(client_frame(text))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause(self) -> None:
        """Stop reading: the peer that never reads."""
        assert self.transport is not None
        self.transport.pause_reading()

    def resume(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _masked(first: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    return (struct.pack("!BB", first, 0x80 | len(payload)) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
