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

from hub.events import Event


class ReplayWindow:
    """The last ``size`` delivered events (``size`` 0: no window)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._events: list[Event] = []
        self._keys: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._keys) - self._start

    _start = 0  # index of the oldest live entry (trimmed lazily, in bulk)

    def add(self, event: Event) -> None:
        if self.size <= 0:
            return
        key = event.key
        keys = self._keys
        if len(keys) > self._start and key <= keys[-1]:
            # Out of order (never expected): drop what the window can no longer vouch for.
            self._events, self._keys, self._start = [], [], 0
            keys = self._keys
        self._events.append(event)
        keys.append(key)
        if len(keys) - self._start > self.size:
            self._start += 1
            if self._start >= self.size:  # compact now and then, not on every event
                del self._events[:self._start]
                del keys[:self._start]
                self._start = 0

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
