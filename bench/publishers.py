"""Publishers: each target is published into through its own native path.

- ``HttpPublisher``: POST JSON ``{type, data}`` to a URL (the peers' /publish, hub's /events),
  over one keep-alive connection with a window of pipelined requests, so a burst is not
  limited by round trips and events leave in publish order.
- ``HubPublisher``: hub's Redis-native ``Publisher`` (``from hub import Publisher``), which
  needs no server round trip at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Publisher(Protocol):
    name: str

    async def start(self) -> None: ...
    async def publish(self, etype: str, data: dict[str, Any]) -> None: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


def event_data(run: str, seq: int) -> dict[str, Any]:
    """A valid threat_detected payload carrying the bench's bookkeeping fields."""
    return {
        "severity": "high",
        "attack_type": "prompt_injection",
        "confidence": 0.9,
        "action_taken": "blocked",
        "run": run,
        "seq": seq,
        "sent_at_ms": time.time() * 1000.0,
    }


class HttpPublisher:
    def __init__(
        self, host: str, port: int, path: str, token: str | None = None, window: int = 32
    ) -> None:
        self.name = f"POST {path}"
        self.host, self.port, self.path, self.token = host, port, path, token
        self._window = asyncio.Semaphore(window)
        self._pending: asyncio.Queue[None] = asyncio.Queue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.errors: list[str] = []
        self.sent = 0

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._read_task = asyncio.create_task(self._read_responses())

    async def _read_responses(self) -> None:
        assert self._reader is not None
        while True:
            await self._pending.get()
            head = await self._reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            chunked = False
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.lower() == "content-length":
                    length = int(v)
                elif k.lower() == "transfer-encoding" and "chunked" in v.lower():
                    chunked = True
            if chunked:
                body = b""
                while True:
                    size = int((await self._reader.readline()).strip(), 16)
                    chunk = await self._reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            else:
                body = await self._reader.readexactly(length)
            if status >= 300 and len(self.errors) < 10:
                self.errors.append(f"{status} {body[:200]!r}")
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.set()
            self._window.release()

    async def publish(self, etype: str, data: dict[str, Any]) -> None:
        assert self._writer is not None
        await self._window.acquire()
        if self._read_task is not None and self._read_task.done():
            self._read_task.result()  # surface the reader's failure
        body = json.dumps({"type": etype, "data": data}).encode()
        headers = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if self.token:
            headers.append(f"Authorization: Bearer {self.token}")
        self._outstanding += 1
        self._idle.clear()
        self._pending.put_nowait(None)
        self._writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
        self.sent += 1

    async def flush(self) -> None:
        assert self._writer is not None
        await self._writer.drain()
        waiter = asyncio.create_task(self._idle.wait())
        assert self._read_task is not None
        done, _ = await asyncio.wait(
            {waiter, self._read_task}, timeout=60, return_when=asyncio.FIRST_COMPLETED
        )
        if self._read_task in done:
            waiter.cancel()
            self._read_task.result()
        if not done:
            waiter.cancel()
            raise TimeoutError(f"{self.name}: {self._outstanding} responses still missing")

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            try:
                await self._read_task
            except asyncio.CancelledError:
                pass
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.errors.append(f"reader: {e!r}")
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


class HubPublisher:
    """hub's Redis-native Publisher; imported lazily so the peers run without hub."""

    def __init__(self, redis_url: str) -> None:
        self.name = "hub.Publisher (Redis)"
        self.redis_url = redis_url
        self._pub: Any = None
        self.errors: list[str] = []
        self.sent = 0

    async def start(self) -> None:
        from hub import Publisher as _HubPublisher  # type: ignore[import-not-found,unused-ignore]

        self._pub = _HubPublisher(self.redis_url)
        opener: Callable[[], Awaitable[Any]] | None = getattr(
            self._pub, "connect", None
        ) or getattr(self._pub, "start", None)
        if opener is not None:
            await opener()

    async def publish(self, etype: str, data: dict[str, Any]) -> None:
        await self._pub.publish(etype, data)
        self.sent += 1

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        for name in ("aclose", "close"):
            closer = getattr(self._pub, name, None)
            if closer is not None:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
                return


def hub_publisher_available() -> bool:
    try:
        from hub import Publisher as _P  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True
