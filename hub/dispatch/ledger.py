"""The Redis backend's ordering and identity rules, as a state machine with no I/O.

In the websockets library's sans-I/O style: :class:`Ledger` is told what happened (an append
succeeded or failed, the reader read an entry, the reader lost Redis, Redis lost its data)
and answers with what to do (which events to deliver to this instance's clients now, which
to keep for appending later, where the reader resumes). ``hub.dispatch.redis`` runs the
commands and feeds the answers back; ``tests/test_ledger.py`` drives interleavings of every
event through it with hypothesis against a model of the Redis side.

The rules:

- **One id per event, chosen at the source.** :class:`Ids` hands out stream-shaped ids
  ``<ms>-<seq>`` whose ``seq`` carries a random per-instance salt in its high bits, so two
  instances never choose the same id, even during an outage when they cannot coordinate.
  The append script puts an event at its id when the stream has not moved past it, else
  (only when appending after an outage) under a new stream position with the id kept in a
  field: the id a publish returned is the id everyone sees, forever. A position that differs
  from the id only ever comes from an outage.
- **Every delivery is keyed by the id.** The reader delivers an entry unless its id was
  delivered here already (``seen``, a bounded window): an event appended twice (a retried
  command that had run, a journal replayed after a crash, a re-append after Redis lost its
  data) reaches each client once.
- **Two paths, never overtaking each other.** Normally the reader delivers everything, this
  instance's own events included, in stream order; ``unread`` holds own events appended but
  not read back yet. When an append fails or its outcome is unknown, or the reader is down,
  events are delivered here at once and become ``pending`` (journalled, appended in order
  when Redis takes them). Before the first of them, the unread ones are delivered too
  ("taken over") and also become pending: if Redis lost them, they are appended again.
- **Redis losing its data** (restart without persistence, a flush) moves the reader back
  to the start of the new stream, and this instance's recently appended events are appended
  again (the append script and ``seen`` make that idempotent), so an instance whose reader
  had not reached them yet still gets them.
"""

from __future__ import annotations

import bisect
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from hub.events import Event, id_key

SALT_BITS = 20
_COUNTER_MASK = (1 << SALT_BITS) - 1

Key = tuple[int, int]


def format_id(key: Key) -> str:
    return f"{key[0]}-{key[1]}"


class Ids:
    """Event ids from one source: after everything it has seen, never chosen by another.

    ``seq`` is ``salt << 20 | counter``: another source's ids differ in their salt, so an
    id this source chose (and may have sent in a command whose outcome it never learnt) is
    never another event's id."""

    def __init__(self, salt: int | None = None) -> None:
        self.salt = secrets.randbits(SALT_BITS) if salt is None else salt
        self._top: Key = (0, 0)

    def learn(self, key: Key) -> None:
        """The stream has reached ``key``: later ids go after it."""
        if key > self._top:
            self._top = key

    def next(self, now_ms: int) -> str:
        top = self._top
        ms, seq = max(now_ms, top[0]), self.salt << SALT_BITS
        if (ms, seq) <= top:
            if top[1] >> SALT_BITS == self.salt and top[1] & _COUNTER_MASK != _COUNTER_MASK:
                seq = top[1] + 1
            else:
                ms = top[0] + 1
        self._top = (ms, seq)
        return format_id(self._top)


def positioned(event: Event, position: str) -> Event:
    """``event`` read at stream ``position``: its id stays, its sort key is the position
    (replay and live delivery order by the stream, where an appended-late event sits)."""
    return Event(id=event.id, type=event.type, timestamp=event.timestamp, data=event.data,
                 _key=id_key(position))


class Ledger:
    """Ordering and identity state of one instance's Redis backend (see the module doc)."""

    def __init__(self, *, seen_limit: int = 100_000, recent_limit: int = 10_000,
                 ids: Ids | None = None) -> None:
        self.ids = ids if ids is not None else Ids()
        self.reader_up = False
        self.last_read: Key = (0, 0)  # the stream position the reader has reached
        self.unread: deque[Event] = deque()  # own, appended, not read back yet (by key)
        self.pending: deque[Event] = deque()  # accepted, not known to be in Redis; in order
        self.recent: deque[Event] = deque(maxlen=recent_limit)  # own, known appended
        self.seen: OrderedDict[str, None] = OrderedDict()  # ids delivered here
        self._seen_limit = seen_limit
        self._new_pending: list[Event] = []  # made pending by the ledger, to journal

    def take_new_pending(self) -> list[Event]:
        """Events the ledger itself made pending since the last call (taken over, passed
        over, appended again after a reset), for the caller to journal."""
        new, self._new_pending = self._new_pending, []
        return new

    # -- publishing ---------------------------------------------------------------------
    @property
    def must_spool(self) -> bool:
        """Whether the next publish must take the pending path: something is pending (it
        must not be overtaken) or the reader is down (nothing would deliver it here)."""
        return bool(self.pending) or not self.reader_up

    def new_id(self, now_ms: int) -> str:
        return self.ids.next(now_ms)

    def stale(self, top: str) -> None:
        """The stream had moved past a proposed id (nothing was appended): learn its top."""
        self.ids.learn(id_key(top))

    def appended(self, event: Event) -> list[Event]:
        """An append of ``event`` succeeded. Returns events to deliver now (taken over, if
        the reader was lost while the command was in flight), already pending."""
        self.recent.append(event)
        if event.id in self.seen:
            return []  # the reader was quicker than the reply: delivered already
        unread = self.unread
        if unread and unread[-1].key > event.key:  # concurrent appends replied out of order
            bisect.insort(unread, event, key=lambda e: e.key)
        else:
            unread.append(event)
        return [] if self.reader_up else self.take_over()

    def take_over(self) -> list[Event]:
        """Own events the reader has not read back: deliver them now, in order, and keep
        them pending in case Redis lost them. Returns them (to deliver and journal)."""
        taken, self.unread = list(self.unread), deque()
        for event in taken:
            self._see(event.id)
            self.pending.append(event)
        self._new_pending += taken
        return taken

    def spool(self, event: Event) -> bool:
        """``event`` takes the pending path: delivered now (by the caller), appended later.
        Call :meth:`take_over` first and deliver what it returns ahead of ``event``.
        Returns False when the reader delivered it already (an append that ran but whose
        outcome was not confirmed, e.g. by a replica): appended again, not delivered."""
        fresh = event.id not in self.seen
        self._see(event.id)
        self.pending.append(event)
        return fresh

    def adopt(self, events: Iterable[Event]) -> None:
        """Events a stopped or crashed instance left in its journal: append them; the reader
        delivers them when it reads them (this instance's clients never had them)."""
        self.pending.extend(events)

    def flushed(self, event: Event) -> None:
        """The head of ``pending`` is in Redis now (appended, or found there already)."""
        if self.pending and self.pending[0] is event:
            self.pending.popleft()
            self.recent.append(event)

    # -- reading ------------------------------------------------------------------------
    def read(self, position: str, event_id: str | None,
             decode: Callable[[], Event | None]) -> list[Event]:
        """The reader read the entry at ``position`` carrying ``event_id`` (None: not an
        event, e.g. a health marker). Returns what to deliver now, in order."""
        key = id_key(position)
        self.last_read = key
        self.ids.learn(key)
        out: list[Event] = []
        own = None
        unread = self.unread
        while unread and unread[0].key <= key:
            event = unread.popleft()
            if event.id == event_id:
                own = event
            elif event.id not in self.seen:
                # Passed over: it is not where it was appended (Redis lost it). Deliver it
                # now, ahead of what follows, and append it again.
                self._see(event.id)
                self.pending.append(event)
                self._new_pending.append(event)
                out.append(event)
        if event_id is None or event_id in self.seen:
            return out
        found = own if own is not None and own.key == key else decode()
        if found is None:
            return out
        if found.key != key:
            found = positioned(found, position)
        self._see(event_id)
        out.append(found)
        return out

    def reader_lost(self) -> list[Event]:
        """The reader lost Redis. Returns own unread events to deliver now (pending)."""
        self.reader_up = False
        return self.take_over()

    def reader_back(self) -> str:
        """The reader is reading again; returns the position to read after."""
        self.reader_up = True
        return format_id(self.last_read)

    def redis_reset(self) -> list[Event]:
        """Redis lost its data (restarted empty, flushed). The reader starts the new stream
        from its beginning; own events appended recently are appended again, for the
        instances that had not read them yet (each delivers an id once). Returns own unread
        events to deliver now (they are pending too)."""
        self.last_read = (0, 0)
        taken = self.take_over()
        queued = {e.id for e in self.pending}
        again = [e for e in self.recent if e.id not in queued]
        self.recent.clear()
        self.pending.extendleft(reversed(again))
        self._new_pending += again
        return taken

    def _see(self, event_id: str) -> None:
        seen = self.seen
        seen[event_id] = None
        seen.move_to_end(event_id)
        if len(seen) > self._seen_limit:
            seen.popitem(last=False)
