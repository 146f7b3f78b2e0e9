"""The dispatcher: every event, whatever its source, takes this one path.

validate → stamp (timestamp here, id by the backend) → backend → every instance's
``_deliver`` → the local members of the room named by the event type, for both transports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from hub.connection import Subscriber
from hub.dispatch.base import Backend, History
from hub.dispatch.window import ReplayWindow
from hub.errors import BackendUnavailable, ErrorCode, EventError, ProtocolError
from hub.events import (
    Event,
    EventTypes,
    id_key,
    is_event_id,
    is_type_name,
    now_timestamp,
    parse_timestamp,
)
from hub.logs import RateLimitedLog
from hub.metrics import Metrics

log = logging.getLogger("hub.dispatch")

# A replay reads the backend's history in pages of this many entries (XRANGE COUNT), and
# sends a client at most what its outbox has room for at a time.
REPLAY_PAGE = 500
# A history read that fails is retried after these delays before the client is told.
HISTORY_RETRY_DELAYS = (0.1, 0.5, 1.5)
# Pages read recently, shared by resumes asking for the same one (a reconnect storm asks
# for the same few pages thousands of times): how many are kept, and for how long.
SHARED_PAGES = 4
SHARED_PAGE_TTL_S = 1.0
# How long a replay waits for room before it checks whether the connection is gone.
ROOM_POLL_S = 1.0


@dataclass(frozen=True, slots=True)
class ResumeResult:
    last_event_id: str
    replayed: int
    truncated: bool
    first_retained: str | None

    def message(self) -> dict[str, Any]:
        """What both transports send the client after a replay (``resumed``)."""
        return {"last_event_id": self.last_event_id, "replayed": self.replayed,
                "truncated": self.truncated, "first_retained_id": self.first_retained}


class Dispatcher:
    def __init__(self, backend: Backend, types: EventTypes, metrics: Metrics, *,
                 max_data_bytes: int, max_subscribe_types: int,
                 batch: Callable[[], AbstractContextManager[None]] = nullcontext,
                 legacy_strict: bool = False,
                 replay_window: int = 2_000) -> None:
        self.backend = backend
        self._batch = batch  # entered around events delivered together (see Backend.start)
        self.types = types
        self.metrics = metrics
        self._max_data_bytes = max_data_bytes
        self._max_subscribe_types = max_subscribe_types
        self._legacy_strict = legacy_strict
        # One room per known type; rooms for types first met on the proxy's channel or in
        # the stream are added as they appear (EventTypes.learn bounds how many).
        self.rooms: dict[str, set[Subscriber]] = {name: set() for name in types.names}
        self._members: set[Subscriber] = set()  # every registered connection
        self._legacy_log = RateLimitedLog(log)
        self._waiters: list[tuple[tuple[int, int], asyncio.Future[None]]] = []
        self._last_delivered: tuple[int, int] = (0, 0)
        self.window = ReplayWindow(replay_window)
        # History pages being read or read lately: after-id → (when issued, the read).
        self._pages: dict[tuple[str, int], tuple[float, asyncio.Task[History]]] = {}

    @property
    def last_delivered(self) -> tuple[int, int]:
        """The key of the newest event this instance delivered ((0, 0): none yet)."""
        return self._last_delivered

    async def start(self) -> None:
        await self.backend.start(self._deliver, self._batch)

    async def stop(self) -> None:
        for _issued, task in self._pages.values():
            task.cancel()
        self._pages.clear()
        await self.backend.stop()

    # -- publishing ---------------------------------------------------------------------
    async def publish(self, type_: object, data: object, *, timestamp: str | None = None) -> Event:
        """Validate, stamp and publish one event; return it with its id."""
        name, clean = self.types.validate(type_, data, max_bytes=self._max_data_bytes)
        event = await self.backend.publish(name, timestamp or now_timestamp(), clean)
        self.metrics.published.labels(name).inc()
        return event

    def parse_legacy(self, raw: bytes) -> tuple[str, str, dict[str, Any]] | None:
        """Read one envelope PUBLISHed on the legacy channel: ``(type, timestamp, data)``
        to append, or None to skip it. Never raises, whatever ``raw`` holds.

        Any well-formed envelope (a JSON object with a type name in ``type`` and an object
        in ``data``) is taken with its ``data`` unchanged and its ``timestamp`` normalised
        (now if missing or unreadable). A spec type whose ``data`` misses hub's schema is
        taken and counted ``nonconforming``; with ``HUB_LEGACY_STRICT`` it is skipped, as
        are types hub was not configured with. Skipped envelopes are logged (rate-limited)
        and counted ``invalid`` by the backend."""
        try:
            envelope = orjson.loads(raw)
            if not isinstance(envelope, dict):
                raise EventError("envelope is not a JSON object", field="")
            name, data, conforming = self.types.check_envelope(
                envelope.get("type"), envelope.get("data"), max_bytes=self._max_data_bytes,
                strict=self._legacy_strict)
            timestamp = parse_timestamp(envelope.get("timestamp")) or now_timestamp()
        except (orjson.JSONDecodeError, EventError) as exc:
            code = getattr(exc, "code", ErrorCode.INVALID_JSON)
            self._legacy_log.warning(
                code, "skipping an envelope on the legacy channel (%s): %s", code, exc)
            return None
        except Exception:
            # A bug in parsing must cost one envelope, never the legacy loop.
            self._legacy_log.warning("bug", "skipping an envelope on the legacy channel that "
                                     "could not be parsed", exc_info=True)
            return None
        if not conforming:
            self.metrics.legacy.labels("nonconforming").inc()
        self._room(name)
        return name, timestamp, data

    # -- delivery -----------------------------------------------------------------------
    async def wait_delivered(self, event: Event, timeout: float) -> bool:
        """Wait until this instance has handed ``event`` to its local clients."""
        if self._last_delivered >= event.key:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (event.key, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return True

    def _deliver(self, event: Event) -> None:
        """Hand ``event`` to this instance's recipients. Never raises: the backend calls it
        after the event was accepted (inside ``publish`` for the memory backend, in the
        stream reader for Redis), and neither may fail because of one recipient."""
        # The room first (it may be new): its members count as live from before this event.
        members = self.rooms.get(event.type)
        if members is None:
            members = self._room(event.type)
        self._last_delivered = event.key
        self.window.add(event)
        if self._waiters:
            self._wake_waiters(event)
        if not members:
            if members is None:
                self.metrics.dropped.labels("type_limit").inc()
                self._legacy_log.warning(
                    "type_limit", "event type %r has no room: HUB_MAX_EVENT_TYPES (%d) types "
                    "are known already; only replays deliver it", event.type[:64],
                    self.types.max_types)
            return
        sent = 0
        tenant = event.tenant
        # Synchronous on purpose: no await between recipients keeps per-instance order and
        # never lets one slow client hold up the others.
        for sub in tuple(members):
            if ((tenant is None or sub.principal.may_see(tenant))
                    and (sub.filter is None or sub.filter.matches(event))):
                try:
                    sub.push(event)
                except Exception:
                    self._send_failed(sub, event)
                    continue
                sent += 1
        self.metrics.delivered.labels(event.type).inc(sent)
        self._observe_latency(event)

    def _send_failed(self, sub: Subscriber, event: Event) -> None:
        """One recipient's send raised: count it, log it (once: the connection leaves every
        room now, so it is never sent to again), close it; the others are unaffected."""
        self.metrics.dropped.labels("send_error").inc()
        log.exception("sending event %s to a %s connection of user %s failed; closing it",
                      event.id, sub.transport, sub.principal.user_id)
        self.remove(sub)
        try:
            sub.close_after_error()
        except Exception:
            log.exception("closing the %s connection after a failed send failed too",
                          sub.transport)

    def _wake_waiters(self, event: Event) -> None:
        key = event.key
        for waited, future in self._waiters:
            if waited <= key and not future.done():
                future.set_result(None)

    def _observe_latency(self, event: Event) -> None:
        try:
            stamped = datetime.fromisoformat(event.timestamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return
        self.metrics.latency.observe(max(0.0, time.time() - stamped))

    # -- membership ---------------------------------------------------------------------
    def _room(self, name: str) -> set[Subscriber] | None:
        """The room of ``name``, added (with every connection that wants it) if the type
        can be learned; None if it cannot."""
        room = self.rooms.get(name)
        if room is not None or not self.types.learn(name):
            return room
        room = self.rooms[name] = set()
        for sub in self._members:
            if self.wants(sub, name):
                room.add(sub)
                sub.live_since[name] = self._last_delivered
                sub.rooms_changed({name}, set())
        return room

    def wants(self, sub: Subscriber, type_: str) -> bool:
        """Whether ``sub``'s subscription covers ``type_`` (known yet or not)."""
        return sub.types is None or type_ in sub.types

    def add(self, sub: Subscriber, types: Iterable[str] | None = None) -> None:
        """Register a new connection: every type, or ``types`` (a first subscribe)."""
        self._members.add(sub)
        if types is not None:
            sub.types = self._kept(set(), types)
        joined = {name for name in self.subscribed_to(sub) if name in self.rooms}
        for name in joined:
            self.rooms[name].add(sub)
            sub.live_since[name] = self._last_delivered
        sub.rooms_changed(joined, set())

    def remove(self, sub: Subscriber) -> None:
        self._members.discard(sub)
        for members in self.rooms.values():
            members.discard(sub)
        sub.mark_closed()

    def subscribed_to(self, sub: Subscriber) -> list[str]:
        return sorted(sub.types) if sub.types is not None else list(self.types.names)

    def check_types(self, value: object) -> list[str]:
        """Validate a client's ``event_types`` list; raise ProtocolError with a distinct code.

        Only a malformed list is an error: names hub does not know are the caller's to
        report (:meth:`unmatched`), and the known ones still apply."""
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProtocolError("event_types must be a list of strings",
                                code=ErrorCode.INVALID_EVENT_TYPES)
        if len(value) > self._max_subscribe_types:
            raise ProtocolError(
                f"event_types lists {len(value)} types, more than {self._max_subscribe_types}",
                code=ErrorCode.TOO_MANY_EVENT_TYPES)
        return value

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The names among ``names`` that match no type this instance knows, in order."""
        return list(dict.fromkeys(n for n in names if n not in self.rooms))

    def subscription_reply(self, sub: Subscriber, requested: Iterable[str]) -> dict[str, Any]:
        """What both transports answer a subscribe/unsubscribe: ``subscribed_to``, and
        ``unknown_event_types`` when some requested names matched no known type."""
        reply: dict[str, Any] = {"subscribed_to": self.subscribed_to(sub)}
        if sub.filter is not None:
            reply["filter"] = sub.filter.describe()
        unmatched = self.unmatched(requested)
        if unmatched:
            reply["unknown_event_types"] = unmatched
        return reply

    def _kept(self, current: set[str], names: Iterable[str]) -> set[str]:
        """``current`` plus the ``names`` a subscription keeps: known ones always; with open
        types, unknown type names too (their room appears with their first event), up to
        ``max_subscribe_types`` of those per connection."""
        kept = set(current)
        pending = sum(1 for n in kept if n not in self.rooms)
        for name in names:
            if name in kept:
                continue
            if name in self.rooms:
                kept.add(name)
            elif (self.types.open and is_type_name(name)
                  and pending < self._max_subscribe_types):
                kept.add(name)
                pending += 1
        return kept

    def subscribe(self, sub: Subscriber, types: list[str]) -> None:
        """The first subscribe narrows the default (everything) to ``types``; later ones add."""
        new = self._kept(set() if sub.types is None else sub.types, types)
        self._set_types(sub, new)

    def unsubscribe(self, sub: Subscriber, types: list[str]) -> None:
        current = set(self.types.names) if sub.types is None else sub.types
        self._set_types(sub, current - set(types))

    def _set_types(self, sub: Subscriber, new: set[str]) -> None:
        old = set(self.subscribed_to(sub))
        left = {name for name in old - new if name in self.rooms}
        joined = {name for name in new - old if name in self.rooms}
        for name in left:
            self.rooms[name].discard(sub)
            sub.live_since.pop(name, None)
        for name in joined:
            self.rooms[name].add(sub)
            sub.live_since[name] = self._last_delivered
        sub.types = new
        sub.rooms_changed(joined, left)

    def release_holds(self) -> None:
        """Stop holding live events for first messages (a graceful stop: what is held,
        the shutdown notice included, must go out before the close)."""
        for sub in tuple(self._members):
            sub.first_message_seen()

    # -- resume -------------------------------------------------------------------------
    def _begin_resume(self, sub: Subscriber, last_event_id: object) -> str:
        """Check the request and start holding live events, synchronously: nothing may
        reach the client between its subscribe and the start of the hold."""
        if not is_event_id(last_event_id):
            self.metrics.resumes.labels("refused").inc()
            raise ProtocolError("last_event_id must be an event id like 1700000000000-0",
                                code=ErrorCode.INVALID_LAST_EVENT_ID)
        if sub.resuming:
            # One replay per connection at a time: a second would hold a second copy of
            # the history; the client waits for ``resumed`` and asks again if it must.
            self.metrics.resumes.labels("refused").inc()
            raise ProtocolError("a resume is already running on this connection; wait for "
                                "its resumed message", code=ErrorCode.RESUME_IN_PROGRESS)
        assert isinstance(last_event_id, str)
        sub.claim_hold()
        return last_event_id

    async def resume(self, sub: Subscriber, last_event_id: object) -> ResumeResult:
        """Send ``sub`` the retained events after ``last_event_id`` that match its
        subscription and tenant, then let live ones through: no gap, no duplicate.

        Raises ProtocolError (the connection stays open) for a malformed id, while another
        resume runs on the connection, or when the history stays unreachable after
        retries; live events go on either way."""
        after = self._begin_resume(sub, last_event_id)
        return await self._run_resume(sub, after)

    def start_resume(self, sub: Subscriber, last_event_id: object
                     ) -> asyncio.Task[ResumeResult]:
        """:meth:`resume` as a task (the connection keeps reading client messages while
        the replay waits for the client to read); the checks and the hold happen now."""
        after = self._begin_resume(sub, last_event_id)
        return asyncio.get_running_loop().create_task(self._run_resume(sub, after))

    async def _run_resume(self, sub: Subscriber, after: str) -> ResumeResult:
        try:
            result = await self._replay(sub, after)
        except BackendUnavailable:
            self.metrics.resumes.labels("unavailable").inc()
            log.warning("resume after %s failed: history unreachable after %d retries; "
                        "the client is told", after, len(HISTORY_RETRY_DELAYS))
            raise ProtocolError("history is unavailable right now; live events continue",
                                code=ErrorCode.HISTORY_UNAVAILABLE) from None
        finally:
            sub.release_hold()
        self.metrics.resumes.labels("truncated" if result.truncated else "ok").inc()
        return result

    async def _replay(self, sub: Subscriber, after: str) -> ResumeResult:
        """Page through the history from ``after`` as the client's outbox has room: from
        the replay window when it covers the cursor (no I/O), else from the backend. Ends
        when a page reaches the head of the history and nothing held was dropped."""
        began = time.monotonic()
        cursor_id, cursor = after, self.window.position(after)
        sent_live_until = sub.last_sent  # before the hold: what went out live
        replayed, truncated, first_retained, first = 0, False, None, True
        while not sub.closed:
            room = sub.replay_room()
            if room <= 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(sub.wait_room(), ROOM_POLL_S)
                continue
            limit = min(room, REPLAY_PAGE)
            if self.window.covers(cursor):
                events: Sequence[Event] = self.window.after(cursor, limit)
                more = len(events) == limit
                head_seen = True  # the window is everything delivered up to now
                end_id = events[-1].id if events else cursor_id
                end_key = events[-1].key if events else cursor
                self.metrics.replay_pages.labels("window").inc()
            else:
                history, issued = await self._history_page(cursor_id, limit, began)
                if history.truncated:
                    if first:
                        truncated, first_retained = True, history.first_retained
                    # (later: trimmed while replaying) either way the client is told.
                    sub.notify_truncated(cursor_id, history.first_retained)
                events = history.events[:limit]
                cut = len(events) < len(history.events)
                more = history.more or cut
                # The cursor moves by stream position (an event appended late, after an
                # outage, sits after higher ids): the last event sent, else the page's end.
                if cut or (events and not history.last_id):
                    end_id, end_key = events[-1].id, events[-1].key
                elif history.last_id:
                    end_id, end_key = history.last_id, id_key(history.last_id)
                else:
                    end_id, end_key = cursor_id, cursor
                # A page read before this replay began cannot say nothing came after it.
                head_seen = issued >= began
                self.metrics.replay_pages.labels("backend").inc()
            first = False
            principal = sub.principal
            live_since = sub.live_since
            batch = [e for e in events if self.wants(sub, e.type) and principal.may_see(e.tenant)
                     and sub.accepts(e)
                     and not (e.type in live_since
                              and live_since[e.type] < e.key <= sent_live_until)]
            with self._batch():  # one write per page, not one per event
                replayed += sub.replay(batch)
            cursor_id, cursor = end_id, end_key
            sub.replayed_until(cursor)
            if more or not head_seen:
                continue
            if sub.held_overflow:
                sub.restart_hold()  # what was dropped is in the history: read it again
                continue
            break
        return ResumeResult(after, replayed, truncated, first_retained)

    async def _history_page(self, after: str, limit: int, began: float
                            ) -> tuple[History, float]:
        """A page of at most ``limit`` events of the backend's history after ``after``,
        shared with other resumes that ask for it: a full page is good whenever it was
        read; one that reached the head only if read after the asking replay began. Reads
        are retried."""
        now = time.monotonic()
        key = (after, limit)
        shared = self._pages.get(key)
        if shared is not None:
            issued, task = shared
            failed = task.done() and (task.cancelled() or task.exception() is not None)
            if not failed and now - issued < SHARED_PAGE_TTL_S and (
                    issued >= began or not task.done() or task.result().more):
                return await asyncio.shield(task), issued
        for key in [k for k, (t, _) in self._pages.items() if now - t >= SHARED_PAGE_TTL_S]:
            del self._pages[key]
        while len(self._pages) >= SHARED_PAGES:
            del self._pages[next(iter(self._pages))]
        task = asyncio.get_running_loop().create_task(self._read_history(after, limit))
        task.add_done_callback(_retrieve)
        self._pages[key] = (now, task)
        return await asyncio.shield(task), now

    async def _read_history(self, after: str, limit: int) -> History:
        for delay in (*HISTORY_RETRY_DELAYS, None):
            try:
                return await self.backend.history(after, limit=limit)
            except BackendUnavailable as exc:
                if delay is None:
                    raise
                self.metrics.history_retries.inc()
                log.warning("history read after %s failed (%s); retrying in %.1fs",
                            after, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def _retrieve(task: asyncio.Task[History]) -> None:
    # A shared read whose every waiter went away: its failure is not worth a warning.
    if not task.cancelled():
        task.exception()
