"""Durable consumers: a cursor the hub keeps for a pipeline, per user and name.

A consumer is a server-kept ``last_event_id``. ``"consumer": NAME`` on a subscribe binds
the connection to the consumer ``NAME`` of its token's user (and tenant): the hub finds
its cursor (creating it at the head of the history, or at the subscribe's
``last_event_id``, the first time) and resumes from it through the ordinary replay path
(hub.dispatch.dispatcher), so the seam to live events has no gap and no duplicate. The
client acknowledges what it has handled (``{"action": "ack", "id": ID}``, a Socket.IO
``ack`` event); acks move the cursor forward only (cumulative: an ack covers every event
before it), so after a disconnect, a crash of the pipeline or a restart of any instance
the consumer gets every event after its last acknowledged one, at least once.

Cursors live behind :class:`CursorStore`: :class:`MemoryCursors` for the embedded
backend, :class:`RedisCursors` (one hash, ``<HUB_STREAM_KEY>:consumers``, changed only by
single-key scripts, so it works on a Redis Cluster client as well) for Redis. A
connection's acks are written one at a time, the newest pending one winning
(:class:`ConsumerCursor`): a pipeline acking every event costs the store far fewer
writes, and a write lost to a crash of the instance only means re-delivery.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from hub.backoff import Backoff
from hub.errors import BackendUnavailable, ErrorCode, ProtocolError
from hub.events import id_key, is_event_id

if TYPE_CHECKING:
    from hub.auth import Principal
    from hub.config import Settings
    from hub.connection import Subscriber
    from hub.dispatch.dispatcher import Dispatcher
    from hub.metrics import Metrics

log = logging.getLogger("hub.consumers")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_NAME = 64
# A failed cursor write is retried, with jittered backoff (hub.backoff) so that the
# consumers of an instance do not retry in step, at most this far apart, until it succeeds
# or the hub stops.
WRITE_RETRY_S = 1.0
# GET /metrics labels lag by consumer name for at most this many names (the laggiest).
METRIC_NAMES = 20
METRICS_READ_S = 1.0


def check_name(value: object) -> str:
    """A consumer name: 1 to 64 letters, digits, ``_ . : -``, starting with a letter or
    digit. Raises ProtocolError ``invalid_consumer``."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        shown = repr(value)[:80]
        raise ProtocolError(f"consumer must be a name of 1 to {MAX_NAME} letters, digits, "
                            f"'_', '.', ':' or '-' (starting with a letter or digit), got "
                            f"{shown}", code=ErrorCode.INVALID_CONSUMER)
    return value


def check_ack_id(value: object) -> str:
    """The id of an ack. Raises ProtocolError ``invalid_ack``."""
    if not is_event_id(value):
        raise ProtocolError("ack needs the id of an event, like 1700000000000-0",
                            code=ErrorCode.INVALID_ACK)
    assert isinstance(value, str)
    return value


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose consumers: the token's subject within its tenant. One user cannot read or
    move another's cursor, whatever names they pick."""

    user_id: str
    tenant: str | None

    @classmethod
    def of(cls, principal: Principal) -> Owner:
        return cls(principal.user_id, principal.tenant)

    def prefix(self) -> str:
        # The store's field names are JSON arrays [tenant, user, name]; this is everything
        # before the name (orjson's output is deterministic), to count one owner's.
        return orjson.dumps([self.tenant, self.user_id]).decode()[:-1] + ","

    def field(self, name: str) -> str:
        return orjson.dumps([self.tenant, self.user_id, name]).decode()


@dataclass(frozen=True, slots=True)
class Record:
    """One consumer as stored: whose, its name, the last acknowledged id (where its
    replay starts), when it was created and last acknowledged."""

    user_id: str
    tenant: str | None
    name: str
    acked: str
    created: float
    acked_at: float | None = None

    @property
    def owner(self) -> Owner:
        return Owner(self.user_id, self.tenant)

    def to_json(self) -> str:
        return orjson.dumps({"user_id": self.user_id, "tenant": self.tenant,
                             "name": self.name, "acked": self.acked,
                             "created": self.created, "acked_at": self.acked_at}).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Record:
        value = orjson.loads(raw)
        acked_at = value.get("acked_at")
        return cls(str(value["user_id"]), value.get("tenant"), str(value["name"]),
                   str(value["acked"]), float(value["created"]),
                   float(acked_at) if isinstance(acked_at, int | float) else None)


def newer(candidate: str, current: str) -> bool:
    """Whether ``candidate`` is after ``current`` (ids compare as ``(ms, seq)``)."""
    try:
        return id_key(candidate) > id_key(current)
    except ValueError:
        return True  # a stored cursor that is not an id (never written so): replace it


class CursorStore(abc.ABC):
    """Where consumers' cursors are kept. Raises BackendUnavailable when it cannot answer."""

    @abc.abstractmethod
    async def register(self, owner: Owner, name: str, start: str, *, max_total: int,
                       max_per_owner: int) -> Record:
        """The consumer ``name`` of ``owner``; created at ``start`` if it does not exist
        (ProtocolError ``too_many_consumers`` past the bounds)."""

    @abc.abstractmethod
    async def ack(self, owner: Owner, name: str, event_id: str) -> None:
        """Move the cursor to ``event_id`` if that is after it (never back); re-create a
        consumer that vanished (a Redis that lost its data) at ``event_id``."""

    @abc.abstractmethod
    async def listing(self) -> list[Record]:
        """Every consumer (at most HUB_CONSUMER_MAX_TOTAL of them)."""

    @abc.abstractmethod
    async def delete(self, owner: Owner, name: str) -> bool:
        """Forget a consumer; False if there was none."""


def _too_many(total: bool, bound: int) -> ProtocolError:
    which = ("the hub keeps" if total else "this user has")
    setting = "HUB_CONSUMER_MAX_TOTAL" if total else "HUB_CONSUMER_MAX_PER_USER"
    return ProtocolError(f"{which} {bound} consumers already ({setting}); reuse a name",
                         code=ErrorCode.TOO_MANY_CONSUMERS)


class MemoryCursors(CursorStore):
    """The embedded backend's: cursors live as long as the process (as its history)."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._per_owner: dict[Owner, int] = {}

    async def register(self, owner: Owner, name: str, start: str, *, max_total: int,
                       max_per_owner: int) -> Record:
        field = owner.field(name)
        found = self._records.get(field)
        if found is not None:
            return found
        if len(self._records) >= max_total:
            raise _too_many(True, max_total)
        if self._per_owner.get(owner, 0) >= max_per_owner:
            raise _too_many(False, max_per_owner)
        record = Record(owner.user_id, owner.tenant, name, start, time.time())
        self._records[field] = record
        self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        return record

    async def ack(self, owner: Owner, name: str, event_id: str) -> None:
        field = owner.field(name)
        found = self._records.get(field)
        if found is None:
            found = Record(owner.user_id, owner.tenant, name, event_id, time.time())
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        elif not newer(event_id, found.acked):
            return
        self._records[field] = Record(found.user_id, found.tenant, name, event_id,
                                      found.created, time.time())

    async def listing(self) -> list[Record]:
        return list(self._records.values())

    async def delete(self, owner: Owner, name: str) -> bool:
        if self._records.pop(owner.field(name), None) is None:
            return False
        self._per_owner[owner] -= 1
        if self._per_owner[owner] <= 0:
            del self._per_owner[owner]
        return True


# Single-key scripts (KEYS[1]: the hash): atomic on one Redis, and on a Redis Cluster
# the one key sits in one slot.
_COMPARE = """
local function num(a)
  a = string.gsub(a, '^0+', '')
  return a
end
local function cmp(a, b)
  a, b = num(a), num(b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function newer(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b or '', '^(%d+)-(%d+)$')
  if not bm then return true end
  local c = cmp(am, bm)
  if c ~= 0 then return c > 0 end
  return cmp(as, bs) > 0
end
"""
# ARGV: field, owner prefix, max total, max per owner, the new record.
REGISTER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then return {'found', cur} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {'total', ''} end
local n, plen = 0, string.len(ARGV[2])
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(k, 1, plen) == ARGV[2] then n = n + 1 end
end
if n >= tonumber(ARGV[4]) then return {'owner', ''} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
return {'created', ARGV[5]}
"""
# ARGV: field, the acknowledged id, now, the record to create if it vanished.
ACK = _COMPARE + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
  return 'created'
end
local rec = cjson.decode(cur)
if not newer(ARGV[2], rec['acked']) then return 'older' end
rec['acked'] = ARGV[2]
rec['acked_at'] = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return 'acked'
"""


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCursors(CursorStore):
    """Cursors in one Redis hash, shared by every instance: field ``[tenant, user,
    name]`` (JSON), value the :class:`Record` as JSON."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key
        self._register = redis.register_script(REGISTER)
        self._ack = redis.register_script(ACK)

    async def register(self, owner: Owner, name: str, start: str, *, max_total: int,
                       max_per_owner: int) -> Record:
        from redis.exceptions import RedisError

        record = Record(owner.user_id, owner.tenant, name, start, time.time())
        try:
            result, raw = await self._register(
                keys=[self.key], args=[owner.field(name), owner.prefix(), max_total,
                                       max_per_owner, record.to_json()])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        outcome = _str(result)
        if outcome == "total":
            raise _too_many(True, max_total)
        if outcome == "owner":
            raise _too_many(False, max_per_owner)
        return Record.from_json(raw)

    async def ack(self, owner: Owner, name: str, event_id: str) -> None:
        from redis.exceptions import RedisError

        now = time.time()
        record = Record(owner.user_id, owner.tenant, name, event_id, now, now)
        try:
            await self._ack(keys=[self.key],
                            args=[owner.field(name), event_id, now, record.to_json()])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc

    async def listing(self) -> list[Record]:
        from redis.exceptions import RedisError

        try:
            values = await self.redis.hvals(self.key)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        records = []
        for raw in values:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                records.append(Record.from_json(raw))
        return records

    async def delete(self, owner: Owner, name: str) -> bool:
        from redis.exceptions import RedisError

        try:
            return bool(await self.redis.hdel(self.key, owner.field(name)))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc


class ConsumerCursor:
    """A connection's binding to its consumer: what it has acknowledged, and the one
    write to the store at a time that carries the newest ack (later acks wait and
    replace each other: at most one write in flight, one pending, per connection)."""

    __slots__ = ("_consumers", "_pending", "_writer", "acked", "name", "owner")

    def __init__(self, consumers: Consumers, owner: Owner, name: str, acked: str) -> None:
        self._consumers = consumers
        self.owner = owner
        self.name = name
        self.acked = acked
        self._pending: str | None = None
        self._writer: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        """What ``subscription_updated`` (or the Socket.IO ack) says about it."""
        return {"name": self.name, "acked_id": self.acked}

    def ack(self, sub: Subscriber, event_id: str) -> bool:
        """Take an ack from ``sub`` (its connection); False if it was not after the cursor
        (ignored). Raises ProtocolError ``unknown_ack_id`` for an id after the last event
        this connection was sent: acknowledging what it never got would skip events."""
        key = id_key(event_id)
        if key > sub.last_sent:
            raise ProtocolError(f"ack {event_id} is after the last event this connection "
                                "was sent; acknowledge only events you have handled",
                                code=ErrorCode.UNKNOWN_ACK_ID)
        if not newer(event_id, self.acked):
            return False
        self.acked = self._pending = event_id
        if self._writer is None or self._writer.done():
            self._writer = self._consumers.spawn(self._write())
        return True

    async def _write(self) -> None:
        store = self._consumers.store
        backoff = Backoff(base=WRITE_RETRY_S / 4, cap=WRITE_RETRY_S)
        while self._pending is not None:
            event_id, self._pending = self._pending, None
            try:
                await store.ack(self.owner, self.name, event_id)
            except BackendUnavailable as exc:
                if self._pending is None:
                    self._pending = event_id
                self._consumers.write_failed(self.name, exc)
                await asyncio.sleep(backoff.next_delay())
            except Exception:
                # A bug, not an outage: say so loudly; the next ack starts a new write.
                log.exception("storing the ack of consumer %r failed", self.name)
                return
            else:
                backoff.reset()
                self._consumers.metrics.consumer_acks.inc()


class Consumers:
    """The durable consumers of one hub instance: its store, bounds and metrics, and what
    every transport calls (:meth:`register`, :meth:`attach`, :meth:`ack`)."""

    def __init__(self, settings: Settings, store: CursorStore, dispatcher: Dispatcher,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed_logged = -60.0

    # -- binding a connection ------------------------------------------------------------
    async def register(self, principal: Principal, name: object,
                       last_event_id: object = None) -> Record:
        """The consumer ``name`` of ``principal`` (validated), created if new: at
        ``last_event_id`` when given, else at the head of the history (from now on).
        Raises ProtocolError (``invalid_consumer``, ``invalid_last_event_id``,
        ``too_many_consumers``, ``consumer_unavailable``)."""
        name = check_name(name)
        if last_event_id is not None and not is_event_id(last_event_id):
            raise ProtocolError("last_event_id must be an event id like 1700000000000-0",
                                code=ErrorCode.INVALID_LAST_EVENT_ID)
        settings = self.settings
        try:
            start = last_event_id if isinstance(last_event_id, str) else await self._head()
            return await self.store.register(
                Owner.of(principal), name, start, max_total=settings.consumer_max_total,
                max_per_owner=settings.consumer_max_per_user)
        except BackendUnavailable as exc:
            log.warning("consumer %r of user %s: cursor unavailable (%s)", name,
                        principal.user_id, exc)
            raise ProtocolError("the consumer's cursor cannot be read right now; "
                                "reconnect and subscribe again",
                                code=ErrorCode.CONSUMER_UNAVAILABLE) from None

    async def _head(self) -> str:
        """Where a new consumer starts: after the newest retained entry (or what this
        instance delivered last, if the history is empty)."""
        page = await self.dispatcher.backend.latest(1)
        if page.head_id is not None:
            return page.head_id
        ms, seq = self.dispatcher.last_delivered
        return f"{ms}-{seq}"

    def check_bindable(self, sub: Subscriber, name: object) -> bool:
        """Before :meth:`register` for a subscribe on a live connection: True if ``sub``
        is bound to this consumer already (nothing to do), False if it may be bound.
        Raises ProtocolError for a different consumer, or while a resume runs."""
        name = check_name(name)
        current = sub.consumer
        if current is not None:
            if current.name == name:
                return True
            raise ProtocolError(f"this connection is bound to consumer {current.name!r}; "
                                "open another connection for another consumer",
                                code=ErrorCode.CONSUMER_CONFLICT)
        if sub.resuming:
            raise ProtocolError("a resume is already running on this connection; wait for "
                                "its resumed message", code=ErrorCode.RESUME_IN_PROGRESS)
        return False

    def attach(self, sub: Subscriber, record: Record) -> str:
        """Bind ``sub`` to ``record``'s consumer; return where its replay starts."""
        sub.consumer = ConsumerCursor(self, record.owner, record.name, record.acked)
        # What went out live before the binding (a consumer named on a later subscribe)
        # is not the consumer's: forget it, so the replay sends it again in order, and an
        # ack of it is refused until the replay has sent it. Acks are cumulative, so the
        # events a consumer is sent must reach it in id order from its cursor on.
        sub.last_sent = (0, 0)
        return record.acked

    def ack(self, sub: Subscriber, event_id: object) -> ConsumerCursor:
        """An ack from ``sub``: validated, then applied (an id not after the cursor is
        ignored). Raises ProtocolError (``invalid_ack``, ``not_a_consumer``,
        ``unknown_ack_id``)."""
        checked = check_ack_id(event_id)
        cursor = sub.consumer
        if cursor is None:
            raise ProtocolError("ack needs a consumer: subscribe with \"consumer\" first",
                                code=ErrorCode.NOT_A_CONSUMER)
        cursor.ack(sub, checked)
        return cursor

    # -- background writes -----------------------------------------------------------------
    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def write_failed(self, name: str, exc: Exception) -> None:
        self.metrics.consumer_write_failures.inc()
        now = time.monotonic()
        if now - self._failed_logged >= 60:  # once a minute at most
            self._failed_logged = now
            log.warning("could not store the ack of consumer %r (%s); retrying at most "
                        "%.0fs apart (further failures are counted in "
                        "hub_consumer_write_failures_total)", name, exc, WRITE_RETRY_S)

    async def stop(self, timeout: float) -> None:
        """Let the acks in flight reach the store (within ``timeout``), then give up on
        them (they are re-delivered: at least once)."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("stopping with %d consumer ack(s) not stored; those events will "
                        "be delivered again", len(pending))

    # -- listing and lag -----------------------------------------------------------------
    def lag(self, acked: str) -> tuple[int, bool, float]:
        """How far a cursor trails: events this instance delivered after it (``exact``
        False: the cursor is older than its replay window, so at least that many), and
        seconds between the cursor's id and the newest delivered one."""
        window = self.dispatcher.window
        try:
            key = id_key(acked)
        except ValueError:
            return 0, False, 0.0
        count, exact = window.count_after(key)
        newest = window.newest or self.dispatcher.last_delivered
        seconds = max(0.0, (newest[0] - key[0]) / 1000) if count else 0.0
        return count, exact, seconds

    async def listing(self, connections: Iterable[Subscriber] = ()) -> list[dict[str, Any]]:
        """Every consumer with its lag, and how many connections of this instance are
        bound to it. Raises BackendUnavailable."""
        bound: dict[tuple[Owner, str], int] = {}
        for conn in connections:
            cursor = conn.consumer
            if cursor is not None:
                bound[(cursor.owner, cursor.name)] = bound.get((cursor.owner, cursor.name),
                                                               0) + 1
        rows = []
        for record in sorted(await self.store.listing(),
                             key=lambda r: (r.tenant or "", r.user_id, r.name)):
            count, exact, seconds = self.lag(record.acked)
            rows.append({
                "user_id": record.user_id, "tenant_id": record.tenant, "name": record.name,
                "acked_id": record.acked, "created": round(record.created, 3),
                "acked_at": None if record.acked_at is None else round(record.acked_at, 3),
                "lag_events": count, "lag_exact": exact, "lag_s": round(seconds, 3),
                "connections_here": bound.get((record.owner, record.name), 0),
            })
        return rows

    async def update_metrics(self) -> None:
        """Set the consumer gauges (called at each scrape of /metrics): a scrape waits at
        most METRICS_READ_S for the store (a frozen Redis must not stall it)."""
        try:
            rows = await asyncio.wait_for(self.listing(), METRICS_READ_S)
        except (BackendUnavailable, TimeoutError):
            return  # the last values stay; the scrape still answers
        metrics = self.metrics
        metrics.consumers.set(len(rows))
        metrics.consumer_lag_max.set(max((r["lag_events"] for r in rows), default=0))
        metrics.consumer_lag_seconds_max.set(max((r["lag_s"] for r in rows), default=0.0))
        by_name: dict[str, int] = {}
        for row in rows:
            by_name[row["name"]] = max(by_name.get(row["name"], 0), row["lag_events"])
        metrics.consumer_lag.clear()
        for name, lag in sorted(by_name.items(), key=lambda kv: -kv[1])[:METRIC_NAMES]:
            metrics.consumer_lag.labels(name).set(lag)


def unbind_after_failed_resume(sub: Subscriber) -> ProtocolError | None:
    """A consumer's replay failed (history unreachable): unbind the connection, so that
    acks of the live events it goes on getting cannot move the cursor past the events the
    replay did not send. The error to tell the client (None: not a consumer)."""
    cursor, sub.consumer = sub.consumer, None
    if cursor is None:
        return None
    return ProtocolError(f"the replay of consumer {cursor.name!r} failed, so this connection "
                         "is no longer bound to it; reconnect and subscribe again",
                         code=ErrorCode.CONSUMER_UNAVAILABLE)


def store_for(settings: Settings, redis: Any) -> CursorStore:
    """Redis when the backend has a client, else memory."""
    if redis is None:
        return MemoryCursors()
    return RedisCursors(redis, settings.stream_key + ":consumers")
