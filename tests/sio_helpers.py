"""python-socketio client helpers for the tests."""

from __future__ import annotations

import asyncio
from typing import Any

import socketio

EVENT_TYPES = ("threat_detected", "provider_health_change", "cost_threshold_alert",
               "system_status")


class SioClient:
    """An official python-socketio AsyncClient that records every hub event it receives."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.other: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.connect_error: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        for name in EVENT_TYPES:
            self.client.on(name, self._recorder(name))
        self.client.on("connect_error", self._on_connect_error)
        for name in ("connection_established", "resumed", "history_truncated", "token_expired",
                     "error"):
            self.client.on(name, self._other_recorder(name))
        self.disconnected = asyncio.Event()
        self.client.on("disconnect", self._on_disconnect)

    def _recorder(self, name: str) -> Any:
        async def record(envelope: dict[str, Any]) -> None:
            assert envelope["type"] == name
            await self.events.put(envelope)
        return record

    def _other_recorder(self, name: str) -> Any:
        async def record(data: Any) -> None:
            await self.other.put((name, data))
        return record

    async def _on_connect_error(self, data: Any) -> None:
        if not self.connect_error.done():
            self.connect_error.set_result(data)

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.disconnected.set()

    async def connect(self, url: str, auth: dict[str, Any] | None = None,
                      transports: list[str] | None = None, **kwargs: Any) -> None:
        await self.client.connect(url, auth=auth, transports=transports or ["websocket"],
                                  wait_timeout=10, **kwargs)

    async def next_other(self, name: str, timeout: float = 10) -> Any:
        """The data of the next non-event message called ``name`` (skipping others)."""
        while True:
            got, data = await asyncio.wait_for(self.other.get(), timeout)
            if got == name:
                return data

    async def next_event(self, type_: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next event (skipping system_status unless asked for)."""
        while True:
            envelope = await asyncio.wait_for(self.events.get(), timeout)
            if type_ is None and envelope["type"] == "system_status":
                continue
            if type_ is None or envelope["type"] == type_:
                return envelope

    async def call(self, event: str, data: Any) -> Any:
        return await self.client.call(event, data, timeout=10)

    async def close(self) -> None:
        await self.client.disconnect()
