"""The replay window: the most recent events this instance delivered, in delivery order.

A resume whose ``last_event_id`` falls inside the window is served from here, with no
Redis call and no decoding: the replayed events are the very objects (and cached frames)
live delivery used. The window is fed synchronously by the dispatcher as it delivers, so
a replay that reaches its newest entry has seen everything delivered so far and can switch
to live events with nothing in between (no await): that is the seam without a gap.

Coverage is claimed only where it is certain: from the oldest entry kept onwards, as long
as deliveries came in increasing id order (they do; if one ever does not, the window
starts again rather than claim what it cannot vouch for).
"""

from __future__ import annotations

import bisect

from hub.events import Event, id_key


class ReplayWindow:
    """The last ``size`` delivered events (``size`` 0: no window), and no more than
    ``max_bytes`` of envelope text (events may be up to 64 KB each; the window must stay
    small whatever they weigh)."""

    def __init__(self, size: int, max_bytes: int = 16 << 20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._events: list[Event] = []
        self._keys: list[tuple[int, int]] = []
        self._sizes: list[int] = []
        self._bytes = 0
        self._start = 0  # index of the oldest entry kept (trimmed lazily, in bulk)
        # Events whose id is not their stream position (appended late, after an outage:
        # hub.dispatch.ledger.positioned): id -> position, for resumes from such an id.
        self._late: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._keys) - self._start

    def add(self, event: Event) -> None:
        if self.size <= 0:
            return
        key = event.key
        if len(self._keys) > self._start and key <= self._keys[-1]:
            # Out of order (never expected): drop what the window can no longer vouch for.
            self._events, self._keys, self._sizes = [], [], []
            self._bytes = self._start = 0
            self._late.clear()
        if key != id_key(event.id):  # positioned: appended late, after an outage
            self._late[event.id] = key
        size = len(event.text)  # encoded once for delivery anyway
        self._events.append(event)
        self._keys.append(key)
        self._sizes.append(size)
        self._bytes += size
        while len(self) > 1 and (len(self) > self.size or self._bytes > self.max_bytes):
            self._bytes -= self._sizes[self._start]
            self._start += 1
        if self._start >= max(self.size, 64):  # compact now and then, not on every event
            if self._late:
                oldest = self._keys[self._start]
                self._late = {i: k for i, k in self._late.items() if k >= oldest}
            del self._events[:self._start]
            del self._keys[:self._start]
            del self._sizes[:self._start]
            self._start = 0

    def position(self, event_id: str) -> tuple[int, int]:
        """Where a resume from ``event_id`` starts: its id's key, or, for an event appended
        late that the window holds, its position (events between the two were sent before
        it, so the client has them)."""
        return self._late.get(event_id) or id_key(event_id)

    def covers(self, after: tuple[int, int]) -> bool:
        """Whether every delivered event with an id greater than ``after`` is here."""
        keys = self._keys
        return len(keys) > self._start and keys[self._start] <= after <= keys[-1]

    @property
    def newest(self) -> tuple[int, int] | None:
        return self._keys[-1] if len(self._keys) > self._start else None

    def after(self, after: tuple[int, int], limit: int) -> list[Event]:
        """Up to ``limit`` events with an id greater than ``after``, oldest first (call
        only when :meth:`covers` says so)."""
        first = bisect.bisect_right(self._keys, after, lo=self._start)
        return self._events[first:first + limit]

    def count_after(self, after: tuple[int, int]) -> tuple[int, bool]:
        """How many delivered events have an id greater than ``after``, and whether that
        is exact (False: ``after`` is older than the window, so at least that many)."""
        keys = self._keys
        if len(keys) <= self._start:
            return 0, False
        if after < keys[self._start]:
            return len(self), False
        return len(keys) - bisect.bisect_right(keys, after, lo=self._start), True
