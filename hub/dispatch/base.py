"""The backend interface and the subscriber every transport's connection derives from.

A backend stamps an event with its id, retains it for resume, and hands it to the
dispatcher of every instance exactly once (``on_event``). It never knows about transports;
the transports never know which backend runs.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from hub.auth import Principal
from hub.events import Event


@dataclass(frozen=True, slots=True)
class History:
    """Retained events after a given id. ``truncated`` when events after it were dropped from
    retention already; ``first_retained`` then names the oldest id still kept."""

    events: Sequence[Event]
    truncated: bool
    first_retained: str | None


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
    async def history(self, after: str) -> History:
        """Retained events with an id greater than ``after``, oldest first."""

    @abc.abstractmethod
    def socketio_manager(self) -> Any:
        """The python-socketio client manager for the Socket.IO server of this instance."""

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


class SubscriberState(enum.Enum):
    LIVE = "live"
    REPLAYING = "replaying"
    CLOSED = "closed"


class Subscriber(abc.ABC):
    """A connection of either transport as the dispatcher sees it.

    ``push`` never blocks: it hands the event to the connection's bounded outbox and one
    writer sends it. While a resume replays history, live events are held back and sent
    after the replay, skipping any the replay already sent, so the seam has no gap and no
    duplicate.
    """

    transport: str

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        # None: no subscribe yet, every type is delivered (the spec's default).
        self.types: set[str] | None = None
        self.state = SubscriberState.LIVE
        self._held: list[Event] = []
        # After a replay: the newest id it sent. Live events up to it were already sent
        # (this instance may read the stream later than the replay read history).
        self._skip_until: tuple[int, int] | None = None
        # What this connection has been sent live, for a resume not to send it twice:
        # per type, the stream position when it joined that room, and the newest id sent.
        self.live_since: dict[str, tuple[int, int]] = {}
        self.last_sent: tuple[int, int] = (0, 0)

    def push(self, event: Event) -> None:
        if self.state is SubscriberState.LIVE:
            if self._skip_until is not None:
                if event.key <= self._skip_until:
                    return
                self._skip_until = None
            self.last_sent = event.key
            self._send(event)
        elif self.state is SubscriberState.REPLAYING:
            self._held.append(event)

    def was_sent(self, event: Event) -> bool:
        """Whether ``event`` already reached this connection live."""
        since = self.live_since.get(event.type)
        return since is not None and since < event.key <= self.last_sent

    def begin_replay(self) -> None:
        """Hold live events back (idempotent: events already held stay held)."""
        if self.state is SubscriberState.LIVE:
            self.state = SubscriberState.REPLAYING

    def replay(self, events: Iterable[Event]) -> int:
        """Send retained events (already filtered); return how many were sent."""
        sent = 0
        for event in events:
            # A replay may exceed the outbox limit (it is bounded by the history size): a
            # client that was cut off as a slow consumer must be able to catch up.
            self._send(event, replay=True)
            self._skip_until = self.last_sent = event.key
            sent += 1
        return sent

    def end_replay(self) -> None:
        if self.state is not SubscriberState.REPLAYING:
            return
        held, self._held = self._held, []
        self.state = SubscriberState.LIVE
        for event in held:
            self.push(event)

    def rooms_changed(self, joined: set[str], left: set[str]) -> None:  # noqa: B027 - optional hook
        """Hook for transports that mirror the rooms elsewhere (python-socketio's manager)."""

    def mark_closed(self) -> None:
        self.state = SubscriberState.CLOSED
        self._held = []

    def notify_truncated(self, last_event_id: str, first_retained: str | None) -> None:
        """Tell the client that events after ``last_event_id`` are no longer retained."""
        self.send_control("history_truncated", {
            "last_event_id": last_event_id, "first_retained_id": first_retained,
            "message": "events after last_event_id were no longer retained; "
                       "the replay starts at first_retained_id",
        })

    @abc.abstractmethod
    def send_control(self, name: str, data: dict[str, Any]) -> None:
        """Send a hub message that is not an event (``resumed``, ``history_truncated``…),
        in order with the events around it."""

    @abc.abstractmethod
    def _send(self, event: Event, replay: bool = False) -> None:
        """Queue one event for the writer; on overflow (not during a replay), disconnect
        as a slow consumer."""
