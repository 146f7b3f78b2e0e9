"""Small client-side helpers shared by the tests (no fixtures here)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

THREAT = {"severity": "high", "attack_type": "prompt_injection", "confidence": 0.92,
          "action_taken": "blocked"}
HEALTH = {"provider": "openai", "old_status": "healthy", "new_status": "degraded"}
COST = {"severity": "warning", "message": "daily budget at 80%", "threshold": 100.0,
        "current_cost": 80.5}


async def ws_connect(url: str, token: str | None = None, **kwargs: Any) -> ClientConnection:
    headers = dict(kwargs.pop("additional_headers", {}) or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await websockets.connect(url, additional_headers=headers, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 10, *,
                    skip_status: bool = True) -> dict[str, Any]:
    """The next message; ``system_status`` events (instances announcing themselves, which
    arrive whenever an instance starts) are skipped unless ``skip_status`` is False."""
    while True:
        message = dict(orjson.loads(await asyncio.wait_for(ws.recv(), timeout)))
        if not skip_status or message.get("type") != "system_status":
            return message


async def recv_type(ws: ClientConnection, type_: str, timeout: float = 10) -> dict[str, Any]:
    """Read until a message of ``type_`` arrives (skipping e.g. system_status)."""
    while True:
        message = await recv_json(ws, timeout, skip_status=False)
        if message["type"] == type_:
            return message


async def send_json(ws: ClientConnection, message: Any) -> None:
    await ws.send(orjson.dumps(message).decode())


async def connected(url: str, token: str, **kwargs: Any) -> ClientConnection:
    """Connect and consume ``connection_established``."""
    ws = await ws_connect(url, token, **kwargs)
    hello = await recv_json(ws)
    assert hello["type"] == "connection_established"
    return ws


async def close_code(ws: ClientConnection, timeout: float = 10) -> tuple[int | None, str]:
    """Wait for the server to close ``ws``; return (code, reason)."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed as exc:
        rcvd = exc.rcvd
        return (rcvd.code if rcvd else None, rcvd.reason if rcvd else "")


def client_frame(text: str) -> bytes:
    """One masked WebSocket text frame, as a client must send it (RFC 6455 5.3)."""
    import os
    import struct

    payload = text.encode()
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def stalled_client(port: int, token: str, path: str = "/ws/events"
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that completes the handshake and then never reads again: the
    slow consumer that per-connection outboxes exist for. (The ``websockets`` client keeps
    reading into its own buffer, so it cannot play this part.)"""
    import base64
    import os

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    # Shrink the receive buffer so the kernel stops accepting data soon.
    import socket

    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.transport.pause_reading()  # type: ignore[attr-defined]  # a socket transport
    return reader, writer


async def wait_until(predicate: Any, timeout: float = 10, what: str = "condition") -> None:
    """Poll ``predicate`` (for state that offers no event to await), failing after timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
