"""Reading the history for ``GET /events``: pages of the backend's history with the same
selection a live connection has (its types, its tenant, its filter).

Without ``after``: the newest ``limit`` matching events, read backwards
(:meth:`Backend.latest`). With ``after``: the matching events after it, read forwards
(:meth:`Backend.history`). Either way at most :data:`MAX_SCAN` retained entries are read
per request, so a filter that matches little costs a bounded amount of work; ``more``
then says where to go on (``next_after``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hub.dispatch.base import Backend, History
from hub.errors import BackendUnavailable
from hub.events import Event

PAGE = 500
MAX_SCAN = 20_000
RETRY_DELAYS = (0.1, 0.5)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    events: list[Event]
    truncated: bool
    first_retained_id: str | None
    next_after: str | None
    more: bool

    def body(self) -> dict[str, Any]:
        return {"events": [e.envelope() for e in self.events], "truncated": self.truncated,
                "first_retained_id": self.first_retained_id, "next_after": self.next_after,
                "more": self.more}


async def _retry(read: Callable[..., Awaitable[History]], *args: Any) -> History:
    for delay in (*RETRY_DELAYS, None):
        try:
            return await read(*args)
        except BackendUnavailable:
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def read_history(backend: Backend, *, after: str | None, limit: int,
                       accept: Callable[[Event], bool]) -> HistoryPage:
    """Up to ``limit`` events that ``accept`` takes, oldest first (see the module)."""
    if after is None:
        return await _latest(backend, limit, accept)
    found: list[Event] = []
    cursor, scanned = after, 0
    truncated, first_retained, more, first = False, None, False, True
    while len(found) < limit and scanned < MAX_SCAN:
        history = await _retry(backend.history, cursor, PAGE)
        if first:
            # first_retained_id only with truncated (as a resume's ``resumed``): the
            # backends know the oldest retained id for certain only then.
            truncated, first = history.truncated, False
            first_retained = history.first_retained if truncated else None
        for event in history.events:
            if accept(event):
                found.append(event)
                if len(found) == limit:
                    # Stop at this event: the next page starts right after it.
                    cut = history.events.index(event) + 1 < len(history.events)
                    return HistoryPage(found, truncated, first_retained, event.id,
                                       cut or history.more)
        scanned += PAGE
        more = history.more
        cursor = history.last_id or cursor
        if not more:
            break
    return HistoryPage(found, truncated, first_retained, cursor, more)


async def _latest(backend: Backend, limit: int, accept: Callable[[Event], bool]) -> HistoryPage:
    found: list[Event] = []
    before: str | None = None
    head: str | None = None
    first_retained: str | None = None
    scanned, older = 0, False
    while len(found) < limit and scanned < MAX_SCAN:
        page = await _retry(backend.latest, PAGE, before)
        if head is None:
            head, first_retained = page.head_id, page.first_retained
        matched = [e for e in page.events if accept(e)]
        found[:0] = matched[-(limit - len(found)):] if matched else []
        scanned += PAGE
        older = page.more
        if not older or page.last_id is None:
            break
        before = page.last_id
    # next_after: the newest entry read, so that ``after=next_after`` gives only what is
    # published after this answer.
    return HistoryPage(found, False, first_retained, head, False)
