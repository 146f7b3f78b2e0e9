"""The backend interface and the subscriber every transport's connection derives from.

A backend stamps an event with its id, retains it for resume, and hands it to the
dispatcher of every instance exactly once (``on_event``). It never knows about transports;
the transports never know which backend runs.
"""

from __future__ import annotations

import abc
import asyncio
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
    # With a ``limit``: whether the page was cut there (more may follow), and the id of the
    # last entry read (past entries skipped as malformed), where the next page starts.
    more: bool = False
    last_id: str | None = None


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
    duplicate. What is held is bounded (``hold_limit``): past it the held events are
    dropped and the replay reads them from the history instead (they are there: the
    window and the stream hold everything this instance delivered).

    A replay is sent page by page as the outbox has room (``replay_room`` / ``wait_room``,
    which transports with a bounded outbox override), so a connection's memory stays
    within its outbox bound whatever it asks to be replayed.
    """

    transport: str

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        # None: no subscribe yet, every type is delivered (the spec's default).
        self.types: set[str] | None = None
        self.state = SubscriberState.LIVE
        self._held: list[Event] = []
        self.held_overflow = False  # held events were dropped: the replay must re-read
        self.hold_limit = 1_000
        # A resume owns the hold from its start to its end; only one runs at a time.
        self.resuming = False
        # Holding live events until the client's first message (see hold_for_first_message).
        self._first_hold: asyncio.TimerHandle | None = None
        # After a replay: the newest id it covered. Live events up to it were already sent
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
            if len(self._held) < self.hold_limit:
                self._held.append(event)
            elif self._first_hold is not None:
                # Holding for a first message that is slow to come: stop holding.
                self.first_message_seen()
                self.push(event)
            else:
                # Bounded: drop what is held; the replay fetches it from the history.
                self._held = []
                self.held_overflow = True

    def was_sent(self, event: Event) -> bool:
        """Whether ``event`` already reached this connection live."""
        since = self.live_since.get(event.type)
        return since is not None and since < event.key <= self.last_sent

    def begin_replay(self) -> None:
        """Hold live events back (idempotent: events already held stay held)."""
        if self.state is SubscriberState.LIVE:
            self.state = SubscriberState.REPLAYING

    def restart_hold(self) -> None:
        """After an overflow: forget what is held (all of it is in the history now)."""
        self._held = []
        self.held_overflow = False

    def replay(self, events: Iterable[Event]) -> int:
        """Send retained events (already filtered); return how many were sent."""
        sent = 0
        for event in events:
            # Not bounded by the outbox limit here: the dispatcher sends a page only as
            # large as ``replay_room`` (a client cut off as a slow consumer must be able to
            # catch up, so a replay never makes it one).
            self._send(event, replay=True)
            self._skip_until = self.last_sent = event.key
            sent += 1
        return sent

    def replayed_until(self, key: tuple[int, int]) -> None:
        """The replay covered every event up to ``key`` (some filtered out): live events
        up to it are not to be sent again."""
        if self._skip_until is None or key > self._skip_until:
            self._skip_until = key

    def end_replay(self) -> None:
        if self.state is not SubscriberState.REPLAYING or self.resuming:
            return
        held, self._held = self._held, []
        self.held_overflow = False
        self.state = SubscriberState.LIVE
        types = self.types
        for event in held:
            # Held before a subscribe narrowed the types: those no longer wanted stay out.
            if types is None or event.type in types:
                self.push(event)

    def hold_for_first_message(self, seconds: float) -> None:
        """Hold live events until the client's first message has been handled (or for
        ``seconds``): a client that resumes with a subscribe message right after connecting
        must not get a live event ahead of its replay."""
        if seconds <= 0 or self.state is not SubscriberState.LIVE:
            return
        self.begin_replay()
        self._first_hold = asyncio.get_running_loop().call_later(
            seconds, self.first_message_seen)

    def first_message_seen(self) -> None:
        """End the hold for the first message (a no-op once it ended, or if a resume has
        taken it over)."""
        timer, self._first_hold = self._first_hold, None
        if timer is None:
            return
        timer.cancel()
        self.end_replay()

    def claim_hold(self) -> None:
        """A resume starts: it takes over any hold and ends it itself."""
        if self._first_hold is not None:
            self._first_hold.cancel()
            self._first_hold = None
        self.resuming = True
        self.begin_replay()

    def release_hold(self) -> None:
        """The resume ended (or failed): let live events through."""
        self.resuming = False
        self.end_replay()

    # -- what a transport with a bounded outbox tells the replay --------------------------
    def replay_room(self) -> int:
        """How many events the outbox takes now without exceeding its bound."""
        return 1 << 30

    async def wait_room(self) -> None:  # noqa: B027 - optional hook
        """Wait until the outbox has room again (or the connection is gone)."""

    @property
    def closed(self) -> bool:
        return self.state is SubscriberState.CLOSED

    def rooms_changed(self, joined: set[str], left: set[str]) -> None:  # noqa: B027 - optional hook
        """Hook for transports that mirror the rooms elsewhere (python-socketio's manager)."""

    def close_after_error(self) -> None:  # noqa: B027 - optional hook
        """A send to this connection raised: close it (the dispatcher dropped it already)."""

    def mark_closed(self) -> None:
        self.state = SubscriberState.CLOSED
        self._held = []
        if self._first_hold is not None:
            self._first_hold.cancel()
            self._first_hold = None

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
