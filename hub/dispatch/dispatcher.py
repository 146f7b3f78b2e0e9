"""The dispatcher: every event, whatever its source, takes this one path.

validate → stamp (timestamp here, id by the backend) → backend → every instance's
``_deliver`` → the local members of the room named by the event type, for both transports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from hub.dispatch.base import Backend, Subscriber
from hub.events import (
    Event,
    EventTypes,
    is_event_id,
    is_type_name,
    now_timestamp,
    parse_timestamp,
)
from hub.exceptions import BackendUnavailable, EventError, ProtocolError
from hub.metrics import Metrics

log = logging.getLogger("hub.dispatch")


class RateLimitedLog:
    """Log a recurring problem once, then at most once per ``every_s`` per key, with how
    many were not logged in between: a flood of bad input must not flood the log."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 max_keys: int = 256) -> None:
        self._log = logger
        self._every_s = every_s
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, suppressed)

    def warning(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        logged_at, suppressed = self._last.get(key, (-1e18, 0))
        if now - logged_at < self._every_s:
            self._last[key] = (logged_at, suppressed + 1)
            return
        if len(self._last) >= self._max_keys and key not in self._last:
            self._last.pop(next(iter(self._last)))
        self._last[key] = (now, 0)
        if suppressed:
            message += " (%d more like it since the last report)"
            args = (*args, suppressed)
        self._log.warning(message, *args, exc_info=exc_info)


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
                 legacy_strict: bool = False) -> None:
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

    async def start(self) -> None:
        await self.backend.start(self._deliver, self._batch)

    async def stop(self) -> None:
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
            code = getattr(exc, "code", "invalid_json")
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
            if tenant is None or sub.principal.may_see(tenant):
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
            raise ProtocolError("event_types must be a list of strings", code="invalid_event_types")
        if len(value) > self._max_subscribe_types:
            raise ProtocolError(
                f"event_types lists {len(value)} types, more than {self._max_subscribe_types}",
                code="too_many_event_types")
        return value

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The names among ``names`` that match no type this instance knows, in order."""
        return list(dict.fromkeys(n for n in names if n not in self.rooms))

    def subscription_reply(self, sub: Subscriber, requested: Iterable[str]) -> dict[str, Any]:
        """What both transports answer a subscribe/unsubscribe: ``subscribed_to``, and
        ``unknown_event_types`` when some requested names matched no known type."""
        reply: dict[str, Any] = {"subscribed_to": self.subscribed_to(sub)}
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

    async def resume(self, sub: Subscriber, last_event_id: object) -> ResumeResult:
        """Send ``sub`` the retained events after ``last_event_id`` that match its
        subscription and tenant, then let live ones through: no gap, no duplicate.

        Raises ProtocolError (the connection stays open) for a malformed id or while the
        history is unreachable; live events go on either way."""
        if not is_event_id(last_event_id):
            raise ProtocolError("last_event_id must be an event id like 1700000000000-0",
                                code="invalid_last_event_id")
        assert isinstance(last_event_id, str)
        sub.begin_replay()
        try:
            history = await self.backend.history(last_event_id)
        except BackendUnavailable:
            sub.end_replay()
            raise ProtocolError("history is unavailable right now; live events continue",
                                code="history_unavailable") from None
        except BaseException:
            sub.end_replay()
            raise
        events = [e for e in history.events if self.wants(sub, e.type)
                  and sub.principal.may_see(e.tenant) and not sub.was_sent(e)]
        if history.truncated:
            sub.notify_truncated(last_event_id, history.first_retained)
        sub.replay(events)
        sub.end_replay()
        return ResumeResult(last_event_id, len(events), history.truncated,
                            history.first_retained)
