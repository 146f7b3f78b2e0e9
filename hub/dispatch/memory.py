"""The embedded default: one process, events retained in memory."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from hub.dispatch.base import Backend, History
from hub.events import Event, id_key


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, history_size: int) -> None:
        self._history: deque[Event] = deque(maxlen=history_size)
        self._on_event: Callable[[Event], None] | None = None
        self._last_ms = 0
        self._seq = 0
        self._evicted: tuple[int, int] | None = None

    async def start(self, on_event: Callable[[Event], None],
                    batch: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self._on_event = on_event  # one event per publish: nothing to batch

    async def stop(self) -> None:
        self._on_event = None

    def _next_id(self) -> str:
        # Same shape as a Redis Stream id (<ms>-<seq>) so clients never see a difference.
        now_ms = int(time.time() * 1000)
        if now_ms > self._last_ms:
            self._last_ms, self._seq = now_ms, 0
        else:
            self._seq += 1
        return f"{self._last_ms}-{self._seq}"

    async def publish(self, type_: str, timestamp: str, data: dict[str, Any]) -> Event:
        event = Event(id=self._next_id(), type=type_, timestamp=timestamp, data=data)
        if len(self._history) == self._history.maxlen:
            self._evicted = id_key(self._history[0].id)
        self._history.append(event)
        if self._on_event is not None:
            self._on_event(event)
        return event

    async def history(self, after: str, limit: int | None = None) -> History:
        after_key = id_key(after)
        kept = self._history
        if not kept:
            return History(events=(), truncated=False, first_retained=None)
        truncated = self._evicted is not None and self._evicted > after_key
        start = bisect.bisect_right(kept, after_key, key=lambda e: e.key)
        stop = len(kept) if limit is None else min(len(kept), start + limit)
        events = list(itertools.islice(kept, start, stop))
        return History(events=events, truncated=truncated, first_retained=kept[0].id,
                       more=stop < len(kept), last_id=events[-1].id if events else None)

    async def latest(self, limit: int, before: str | None = None) -> History:
        kept = self._history
        if not kept:
            return History(events=(), truncated=False, first_retained=None)
        stop = len(kept) if before is None else bisect.bisect_left(
            kept, id_key(before), key=lambda e: e.key)
        start = max(0, stop - limit)
        events = list(itertools.islice(kept, start, stop))
        return History(events=events, truncated=False, first_retained=kept[0].id,
                       more=start > 0, last_id=events[0].id if events else None,
                       head_id=events[-1].id if events else None)

    @property
    def connected(self) -> bool:
        return True
