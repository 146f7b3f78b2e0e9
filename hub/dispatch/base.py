"""The backend interface.

A backend stamps an event with its id, retains it for resume, and hands it to the
dispatcher of every instance exactly once (``on_event``). It never knows about transports;
the transports never know which backend runs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from hub.events import Event


@dataclass(frozen=True, slots=True)
class History:
    """Retained events after a given id. ``truncated`` when events after it were dropped from
    retention already; ``first_retained`` then names the oldest id still kept."""

    events: Sequence[Event]
    truncated: bool
    first_retained: str | None
    # With a ``limit``: whether the page was cut there (more may follow), and the id of the
    # last entry read (past entries skipped as malformed), where the next page starts.
    more: bool = False
    last_id: str | None = None
    # For :meth:`Backend.latest` (a page read backwards): ``more`` says older entries
    # exist, ``last_id`` is the oldest entry read (the next page ends before it) and
    # ``head_id`` the newest one.
    head_id: str | None = None


class Backend(abc.ABC):
    """Where events are stamped, retained and shared between instances."""

    name: str

    @abc.abstractmethod
    async def start(self, on_event: Callable[[Event], None],
                    batch: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        """Connect and start delivering every event of the deployment to ``on_event``;
        events received together are delivered inside one ``batch()`` block."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop background work and release connections (not a host-owned Redis client)."""

    @abc.abstractmethod
    async def publish(self, type_: str, timestamp: str, data: dict[str, Any]) -> Event:
        """Stamp an id, retain and share the event; return it once it is accepted."""

    @abc.abstractmethod
    async def history(self, after: str, limit: int | None = None) -> History:
        """Retained events with an id greater than ``after``, oldest first; at most
        ``limit`` of them (a page: ``more`` says whether it was cut)."""

    @abc.abstractmethod
    async def latest(self, limit: int, before: str | None = None) -> History:
        """The newest ``limit`` retained entries (older than ``before`` when given), their
        events oldest first: a page read backwards (``more``: older ones remain)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the backend is live (for the memory backend: always)."""

    def status(self) -> dict[str, Any]:
        return {}

    def problems(self) -> list[str]:
        """Why the backend is degraded, worst first (health's ``reasons``); empty if not."""
        return [] if self.connected else ["backend not connected"]

    @property
    def subscribed(self) -> bool:
        """Whether a live subscriber receives other instances' events (health's
        ``redis_connected`` for the Redis backend)."""
        return self.connected
