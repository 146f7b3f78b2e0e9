"""A Server-Sent Events reader for the tests: httpx streaming, parsed per the HTML spec's
event-stream rules (fields up to a blank line; comments start with a colon)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


class SseStream:
    """One open ``/events/stream`` response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 10) -> SseEvent | None:
        """The next dispatched block (an event, a retry hint or a comment); None at the end
        of the stream."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> SseEvent | None:
        block = SseEvent()
        seen = False
        data: list[str] = []
        async for line in self._lines:
            if line == "":
                if seen:
                    block.data = "\n".join(data)
                    return block
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                block.comments.append(value)
            elif name == "data":
                data.append(value)
            elif name == "event":
                block.event = value
            elif name == "id":
                block.id = value
            elif name == "retry":
                block.retry = int(value)
        return None

    async def next_event(self, name: str | None = None, timeout: float = 10) -> SseEvent:
        """The next block with data (skipping comments and the retry hint), of ``name``
        if given."""
        while True:
            block = await self.next(timeout)
            if block is None:
                raise AssertionError(f"the stream ended before an event {name or ''}")
            if block.data and (name is None or block.event == name):
                return block

    async def events_until(self, name: str, timeout: float = 10) -> list[SseEvent]:
        """Every event up to (not including) the first one named ``name``."""
        seen: list[SseEvent] = []
        while True:
            block = await self.next_event(timeout=timeout)
            if block.event == name:
                return seen
            seen.append(block)


@contextlib.asynccontextmanager
async def sse_connect(base_url: str, token: str | None = None, *, params: Any = None,
                      headers: dict[str, str] | None = None,
                      cookie: bool = False) -> AsyncIterator[SseStream]:
    """Open the stream; the response must be 200 (see :func:`sse_refusal` otherwise)."""
    sent = dict(headers or {})
    if token is not None:
        if cookie:
            sent["cookie"] = f"ks_access_token={token}"
        else:
            sent["authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client, \
            client.stream("GET", f"{base_url}/events/stream", params=params,
                          headers=sent) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseStream(response)


async def sse_refusal(base_url: str, headers: dict[str, str] | None = None,
                      params: Any = None) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{base_url}/events/stream", headers=headers,
                                    params=params)
    return response.status_code, response.json()
