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
from hub.events import Event, EventTypes, is_event_id, now_timestamp, parse_timestamp
from hub.exceptions import BackendUnavailable, EventError, ProtocolError
from hub.metrics import Metrics

log = logging.getLogger("hub.dispatch")


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
                 batch: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self.backend = backend
        self._batch = batch  # entered around events delivered together (see Backend.start)
        self.types = types
        self.metrics = metrics
        self._max_data_bytes = max_data_bytes
        self._max_subscribe_types = max_subscribe_types
        self.rooms: dict[str, set[Subscriber]] = {name: set() for name in types.names}
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
        """Validate an envelope PUBLISHed by the proxy on the legacy channel; None if invalid."""
        try:
            envelope = orjson.loads(raw)
            if not isinstance(envelope, dict):
                raise EventError("envelope is not a JSON object", field="")
            name, clean = self.types.validate(
                envelope.get("type"), envelope.get("data"), max_bytes=self._max_data_bytes)
        except (orjson.JSONDecodeError, EventError) as exc:
            log.warning("ignoring invalid envelope on the legacy channel: %s", exc)
            return None
        return name, parse_timestamp(envelope.get("timestamp")) or now_timestamp(), clean

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
        self._last_delivered = event.key
        if self._waiters:
            self._wake_waiters(event)
        members = self.rooms.get(event.type)
        if not members:
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
    def add(self, sub: Subscriber, types: Iterable[str] | None = None) -> None:
        """Register a new connection: every type, or ``types`` (a first subscribe)."""
        if types is not None:
            sub.types = set(types)
        joined = set(self.subscribed_to(sub))
        for name in joined:
            self.rooms[name].add(sub)
            sub.live_since[name] = self._last_delivered
        sub.rooms_changed(joined, set())

    def remove(self, sub: Subscriber) -> None:
        for members in self.rooms.values():
            members.discard(sub)
        sub.mark_closed()

    def subscribed_to(self, sub: Subscriber) -> list[str]:
        return sorted(sub.types) if sub.types is not None else list(self.types.names)

    def check_types(self, value: object) -> list[str]:
        """Validate a client's ``event_types`` list; raise ProtocolError with a distinct code."""
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProtocolError("event_types must be a list of strings", code="invalid_event_types")
        if len(value) > self._max_subscribe_types:
            raise ProtocolError(
                f"event_types lists {len(value)} types, more than {self._max_subscribe_types}",
                code="too_many_event_types")
        unknown = self.types.unknown(value)
        if unknown:
            raise ProtocolError(
                f"unknown event type(s): {', '.join(unknown)}; "
                f"known: {', '.join(self.types.names)}",
                code="unknown_event_type")
        return value

    def subscribe(self, sub: Subscriber, types: list[str]) -> None:
        """The first subscribe narrows the default (everything) to ``types``; later ones add."""
        new = set(types) if sub.types is None else sub.types | set(types)
        self._set_types(sub, new)

    def unsubscribe(self, sub: Subscriber, types: list[str]) -> None:
        current = set(self.types.names) if sub.types is None else sub.types
        self._set_types(sub, current - set(types))

    def _set_types(self, sub: Subscriber, new: set[str]) -> None:
        old = set(self.subscribed_to(sub))
        for name in old - new:
            self.rooms[name].discard(sub)
            sub.live_since.pop(name, None)
        for name in new - old:
            self.rooms[name].add(sub)
            sub.live_since[name] = self._last_delivered
        sub.types = new
        sub.rooms_changed(new - old, old - new)

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
        wanted = set(self.subscribed_to(sub))
        events = [e for e in history.events if e.type in wanted
                  and sub.principal.may_see(e.tenant) and not sub.was_sent(e)]
        if history.truncated:
            sub.notify_truncated(last_event_id, history.first_retained)
        sub.replay(events)
        sub.end_replay()
        return ResumeResult(last_event_id, len(events), history.truncated,
                            history.first_retained)
