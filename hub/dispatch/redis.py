"""The Redis backend: a Redis Stream carries events between instances.

Every event is appended to one stream (``HUB_STREAM_KEY``) with ``XADD``; the stream id is
the event id, so ids are unique and ordered across the deployment and the stream doubles
as the resume history (trimmed to about ``HUB_HISTORY_SIZE``). Each instance reads the
stream from the last id it delivered: after a Redis outage it picks up where it stopped,
so nothing published meanwhile is lost or delivered twice. While Redis (or this
instance's reader) is down, what this instance publishes is delivered to its own clients at
once and spooled, then appended when Redis returns (see ``RedisBackend.__init__``).

python-socketio's own cross-instance channel keeps working beside it: the Socket.IO
server's client manager is an ``AsyncRedisManager``, so an external process emitting
through a write-only ``AsyncRedisManager`` reaches this instance's Socket.IO clients.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import socketio
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from hub.backoff import Backoff
from hub.dispatch.base import Backend, History
from hub.dispatch.manager import ConnectHookMixin, local_emit, refuse_tenant_emit
from hub.events import Event, id_key
from hub.exceptions import BackendUnavailable

log = logging.getLogger("hub.redis")

LegacyParser = Callable[[bytes], tuple[str, str, dict[str, Any]] | None]

# Several instances receive every message PUBLISHed on the legacy channel; only the first
# to claim the message's digest appends it, in one atomic step, so it enters the stream
# (and reaches each client) exactly once however many instances run.
_INGEST_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
end
return false
"""
LEGACY_DEDUP_MS = 60_000

# Appending a spooled event after an outage: under its own id if the stream has not moved
# past it; not at all if that very entry is already there (an event this instance appended
# before the outage, which Redis kept); else under a fresh id, naming the id it had before
# (``k``) if it had one, so that readers which read it then skip it now. Marked with the
# instance (``o``): its reader delivered the event locally already.
_APPEND_SPOOLED = """
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[2],
                          'e', ARGV[3], 'o', ARGV[4])
if type(added) ~= 'table' or not added.err then
  return added
end
if ARGV[5] == '1' then
  local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
  if #found > 0 and found[1][2][2] == ARGV[3] then
    return false
  end
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                    'e', ARGV[3], 'o', ARGV[4], 'k', ARGV[2])
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[3], 'o', ARGV[4])
"""


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Any, name: str) -> str | None:
    value = fields.get(name.encode(), fields.get(name))
    return None if value is None else _str(value)


async def append(redis: Any, key: str, maxlen: int, body: bytes) -> str:
    """XADD one event body; return its id. Raises BackendUnavailable when Redis is down."""
    try:
        event_id = await redis.xadd(key, {"e": body}, maxlen=maxlen, approximate=True)
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(f"redis unavailable: {exc}") from exc
    return _str(event_id)


# A command that finds every pooled connection in use waits this long for one (redis-py's
# default pool raises at once: a burst of resumes was refused for lack of connections).
POOL_WAIT_S = 2.0


def open_redis(url: str, max_connections: int = 100) -> aioredis.Redis:
    if url.startswith("redis+sentinel://"):
        from socketio.redis_manager import parse_redis_sentinel_url

        sentinels, service, kwargs = parse_redis_sentinel_url(url)
        sentinel = aioredis.Sentinel(sentinels, **kwargs)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(service or "mymaster")
        return master
    # Bounded timeouts: a vanished Redis must fail calls (and trigger the outage spool),
    # not hang them; XREAD blocks for 1 s, well inside the socket timeout. One immediate
    # retry on a fresh connection when a pooled one turns out closed (as after a Redis
    # restart): without it the first command on each stale connection fails. Timeouts
    # are not retried: the command may have run.
    # A blocking pool: past ``max_connections`` in use, a command waits for one to be
    # released instead of failing (history reads are bounded apart, see history()).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S,
        health_check_interval=10, socket_connect_timeout=5, socket_timeout=15,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError])
    return aioredis.Redis.from_pool(pool)


class HubRedisManager(ConnectHookMixin, socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's Redis manager on hub's Redis client, with the encode-once emit."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        super().__init__(channel=channel)
        self._client = client

    def _redis_connect(self) -> None:
        # python-socketio calls this again after each lost connection: keep the one PubSub
        # (it reconnects and subscribes again itself); a new one each time would strand
        # the old one's pool connection.
        self.redis = self._client
        if getattr(self, "pubsub", None) is None:
            self.pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _listen(self) -> Any:
        # The host's client may decode responses, so the channel may be str or bytes.
        async for message in self._redis_listen_with_retries():
            if message.get("type") == "message" and _str(message["channel"]) == self.channel:
                yield message["data"]

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        if message.get("callback") is not None or message.get("binary"):
            if not refuse_tenant_emit(message.get("event"), message.get("data")):
                await super()._handle_emit(message)
            return
        data = message["data"]
        if isinstance(data, list):
            data = data[0] if len(data) == 1 else tuple(data)
        local_emit(
            self,
            message["event"], data, message.get("namespace") or "/",
            message.get("room"), message.get("skip_sid"),
        )


class RedisBackend(Backend):
    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        owns_client: bool,
        stream_key: str,
        history_size: int,
        socketio_channel: str,
        legacy_channel: str,
        legacy_parser: LegacyParser,
        instance_id: str,
        on_reconnect: Callable[[], None] = lambda: None,
        on_spool_overflow: Callable[[], None] = lambda: None,
        on_legacy: Callable[[str], None] = lambda result: None,
        history_concurrency: int = 8,
    ) -> None:
        # redis-py's stubs type replies per decode_responses setting; the host's client may
        # use either, and _str() handles both, so replies are taken as Any here.
        self.redis: Any = client
        self._owns_client = owns_client
        self._key = stream_key
        self._maxlen = history_size
        self._legacy_channel = legacy_channel
        self._legacy_parser = legacy_parser
        self._on_reconnect = on_reconnect
        self._on_legacy = on_legacy
        self._on_event: Callable[[Event], None] | None = None
        self._batch: Callable[[], AbstractContextManager[None]] = nullcontext
        self._last_id = "0-0"
        # Liveness of each background loop; `connected` is the stream reader and legacy
        # subscriber being up (the spool flusher is idle while Redis is fine).
        self._alive: dict[str, bool] = {"stream": False, "legacy": not legacy_channel,
                                        "spool": True}
        self._instance_id = instance_id
        # Resumes queue here rather than take every pooled connection (or fail for lack of
        # one): a reconnect storm costs at most this many connections at a time.
        self._history_slots = asyncio.Semaphore(history_concurrency)
        # Local delivery follows one of two paths, and they must never overtake each other:
        # - normally the stream reader delivers every event, this instance's own included,
        #   in stream order; ``_unread`` holds the events this instance appended that the
        #   reader has not read back yet (usually none: it trails by a round trip);
        # - while Redis or the reader is down, events are delivered at once and spooled,
        #   to be appended (in order) when Redis returns. Before the first of them, the
        #   unread ones are delivered too ("taken over"), ahead of it; the reader skips
        #   them if Redis kept them (``_early``) and the spool appends them if it did not.
        self._unread: deque[Event] = deque()
        self._early: list[tuple[int, int]] = []
        self._spool: deque[tuple[Event, bool]] = deque()  # (event, appended before)
        self._lost_at = "0-0"  # where the reader was when it last lost Redis
        self._spool_limit = history_size
        self._spool_ready = asyncio.Event()
        self._on_spool_overflow = on_spool_overflow
        self._provisional = (0, 0)
        self._delivered_top = (0, 0)  # the newest id this backend delivered locally
        self.loops: dict[str, asyncio.Task[None]] = {}  # the background loops, by name
        self._legacy_pubsub: Any = None  # subscribed at start, until the loop takes it
        self._manager = HubRedisManager(client, socketio_channel)
        self._ingest = client.register_script(_INGEST_ONCE)
        self._append_spooled = client.register_script(_APPEND_SPOOLED)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, on_event: Callable[[Event], None],
                    batch: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self._on_event = on_event
        self._batch = batch
        # Start reading after the newest event that exists now: older ones are history.
        newest = await self.redis.xrevrange(self._key, count=1)
        self._last_id = _str(newest[0][0]) if newest else "0-0"
        self._alive["stream"] = True
        loops = {"stream": self._read_stream, "spool": self._flush_spool}
        if self._legacy_channel:
            self._legacy_pubsub = await self._subscribe_legacy()
            loops["legacy"] = self._read_legacy
        for name, loop in loops.items():
            self.loops[name] = asyncio.create_task(self._supervise(loop, name))

    async def stop(self) -> None:
        for task in self.loops.values():
            task.cancel()
        await asyncio.gather(*self.loops.values(), return_exceptions=True)
        self.loops.clear()
        if self._legacy_pubsub is not None:  # its loop never got to take it
            await self._legacy_pubsub.aclose()
            self._legacy_pubsub = None
        thread = getattr(self._manager, "thread", None)
        if thread is not None:
            thread.cancel()
            await asyncio.gather(thread, return_exceptions=True)
        pubsub: Any = self._manager.pubsub
        if pubsub is not None:
            await pubsub.aclose()
        if self._owns_client:
            await self.redis.aclose()

    @property
    def connected(self) -> bool:
        return self._alive["stream"] and self._alive["legacy"]

    def status(self) -> dict[str, Any]:
        return {"stream": self._key, "last_id": self._last_id,
                "alive": dict(self._alive), "spooled": len(self._spool)}

    def socketio_manager(self) -> Any:
        return self._manager

    # -- events -------------------------------------------------------------------------
    async def publish(self, type_: str, timestamp: str, data: dict[str, Any]) -> Event:
        event = Event(id="", type=type_, timestamp=timestamp, data=data)
        # While anything is spooled, later events queue behind it; while the reader is
        # down, nothing would deliver an appended event here: spool it (delivered now).
        if not self._spool and self._alive["stream"]:
            try:
                event.id = await append(self.redis, self._key, self._maxlen, event.body())
            except BackendUnavailable as exc:
                log.warning("redis unavailable (%s): spooling events, delivering locally", exc)
            else:
                self._appended(event)
                return event
        self._take_over_unread()
        self._spool_event(event)
        return event

    def _appended(self, event: Event) -> None:
        """Note an event this instance appended, for its reader to deliver when it reads it
        back (or for a take-over, should the reader be lost first)."""
        if event.key <= id_key(self._last_id):
            return  # the reader was quicker than the reply to XADD: delivered already
        unread = self._unread
        if unread and unread[-1].key > event.key:  # concurrent publishes replied out of order
            bisect.insort(unread, event, key=lambda e: e.key)
        else:
            unread.append(event)
        if not self._alive["stream"]:
            self._take_over_unread()  # the reader was lost while this XADD was in flight

    def _take_over_unread(self) -> None:
        """Deliver here, now and in order, the events this instance appended that its reader
        has not read back, and spool them in case Redis lost them."""
        if not self._unread:
            return
        unread, self._unread = self._unread, deque()
        for event in unread:
            bisect.insort(self._early, event.key)
            self._spool_event(event, appended_before=True)

    def _spool_event(self, event: Event, appended_before: bool = False) -> None:
        """Deliver ``event`` to this instance's clients now and queue it for the stream.
        An event that was never appended gets a provisional id here."""
        if not appended_before:
            event.id = self._provisional_id()
        if len(self._spool) >= self._spool_limit:
            lost, _ = self._spool.popleft()
            self._on_spool_overflow()
            log.error("outage spool full: event %s will not reach other instances", lost.id)
        self._spool.append((event, appended_before))
        self._spool_ready.set()
        self._deliver_local(event)

    def _deliver_local(self, event: Event) -> None:
        self._delivered_top = max(self._delivered_top, event.key)
        if self._on_event is not None:
            self._on_event(event)

    def _provisional_id(self) -> str:
        # Stream-shaped and after everything seen or delivered so far; the flusher keeps
        # this id when Redis accepts it (always after a restart that lost the stream).
        seen = max(id_key(self._last_id), self._delivered_top)
        ms = max(int(time.time() * 1000), seen[0], self._provisional[0])
        seq = self._provisional[1] + 1 if ms == self._provisional[0] else 0
        if ms == seen[0]:
            seq = max(seq, seen[1] + 1)
        self._provisional = (ms, seq)
        return f"{ms}-{seq}"

    async def _flush_spool(self) -> None:
        while True:
            await self._spool_ready.wait()
            while self._spool:
                event, appended_before = self._spool[0]
                await self._append_spooled(keys=[self._key], args=[
                    self._maxlen, event.id, event.body(), self._instance_id,
                    "1" if appended_before else "0"])
                self._spool.popleft()
            self._spool_ready.clear()
            log.info("outage spool flushed to redis")

    async def history(self, after: str, limit: int | None = None) -> History:
        # From ``after`` itself: when that entry is still there, nothing after it was
        # trimmed, so the common resume (from an id the client saw) is one XRANGE, with no
        # XINFO. ``limit + 2``: the entry itself may come first, and one more than the page
        # says whether more follow.
        count = None if limit is None else limit + 2
        try:
            async with self._history_slots:
                entries = await self.redis.xrange(self._key, min=after, max="+", count=count)
                known = bool(entries) and _str(entries[0][0]) == after
                info = None if known else await self.redis.xinfo_stream(self._key)
        except aioredis.ResponseError:
            # No stream yet: nothing was ever published, so nothing is missing either.
            return History(events=(), truncated=False, first_retained=None)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        if known:
            entries = entries[1:]
        more = limit is not None and len(entries) > limit
        if more:
            entries = entries[:limit]
        events = [ev for ev in map(self._decode, entries) if ev is not None]
        last_id = _str(entries[-1][0]) if entries else None
        if info is None:
            return History(events=events, truncated=False, first_retained=None, more=more,
                           last_id=last_id)
        first = info.get("first-entry")
        first_id = _str(first[0]) if first else None
        # Trimming leaves no trace but the first entry moving on: if the client's id is older
        # than the oldest retained one, events in between may be gone (the id itself was
        # trimmed). Conservative: it may say so when the gap held nothing.
        added = info.get("entries-added")  # Redis >= 7; older servers: assume trimming
        trimmed = added is None or added > info.get("length", 0)
        truncated = first_id is not None and trimmed and id_key(first_id) > id_key(after)
        return History(events=events, truncated=truncated, first_retained=first_id,
                       more=more, last_id=last_id)

    def _decode(self, entry: Any) -> Event | None:
        raw_id, fields = entry
        body = fields.get(b"e", fields.get("e"))
        try:
            return Event.from_body(_str(raw_id), body)
        except (ValueError, KeyError, TypeError):
            log.warning("skipping malformed stream entry %s", _str(raw_id))
            return None

    # -- background loops ---------------------------------------------------------------
    async def _supervise(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``loop`` forever: on a Redis error, mark it dead, back off, reconnect."""
        backoff = Backoff()
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._alive[name]:
                    backoff.reset()  # it had recovered since the last failure
                self._set_alive(name, False)
                delay = backoff.next_delay()
                log.warning("redis %s loop lost its connection (%s); retrying in %.2fs",
                            name, exc, delay)
                await asyncio.sleep(delay)
                self._on_reconnect()
            except Exception:
                # A bug, not an outage: log it loudly and keep the instance serving.
                self._set_alive(name, False)
                log.exception("redis %s loop crashed; restarting", name)
                await asyncio.sleep(backoff.next_delay())
            else:  # pragma: no cover - the loops only return when cancelled
                return

    def _set_alive(self, name: str, alive: bool) -> None:
        self._alive[name] = alive

    async def _read_stream(self) -> None:
        try:
            while True:
                response = await self.redis.xread({self._key: self._last_id}, count=1000,
                                                  block=1000)
                self._alive["stream"] = True
                for _stream, entries in response or ():
                    # Several events read at once: one write per client for all of them.
                    with self._batch() if len(entries) > 1 else nullcontext():
                        for entry in entries:
                            self._read_entry(entry)
        except (RedisError, OSError):
            # Until it is back, this instance delivers what it publishes itself.
            self._lost_at = self._last_id
            self._take_over_unread()
            raise

    def _read_entry(self, entry: Any) -> None:
        self._last_id = _str(entry[0])
        key = id_key(self._last_id)
        unread = self._unread
        own = None  # this instance's own event: no need to decode it again
        while unread and unread[0].key <= key:
            own = unread.popleft()
        fields = entry[1]
        if self._was_delivered_early(key) or _field(fields, "o") == self._instance_id:
            return  # delivered locally already (spooled or taken over)
        appended_before = _field(fields, "k")
        if appended_before is not None and id_key(appended_before) <= id_key(self._lost_at):
            return  # appended again after Redis lost it, but read here before that
        event = own if own is not None and own.key == key else self._decode(entry)
        if event is not None:
            self._deliver_local(event)

    def _was_delivered_early(self, key: tuple[int, int]) -> bool:
        early = self._early
        if not early:
            return False
        passed = bisect.bisect_left(early, key)
        found = passed < len(early) and early[passed] == key
        # Entries before this one that the reader never met were lost with Redis's data
        # (and appended again, under new ids, from the spool): forget them.
        del early[:passed + found]
        return found

    async def _subscribe_legacy(self) -> Any:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._legacy_channel)
        except BaseException:
            await pubsub.aclose()
            raise
        self._alive["legacy"] = True
        return pubsub

    async def _read_legacy(self) -> None:
        # Subscribed in start() the first time (an instance is healthy once started), here
        # again after a lost connection.
        pubsub, self._legacy_pubsub = self._legacy_pubsub, None
        if pubsub is None:
            pubsub = await self._subscribe_legacy()
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                await self._ingest_legacy(message["data"])
        finally:
            await pubsub.aclose()

    async def _ingest_legacy(self, raw: bytes | str) -> None:
        payload = raw.encode() if isinstance(raw, str) else raw
        parsed = self._legacy_parser(payload)
        if parsed is None:
            self._on_legacy("invalid")
            return
        type_, timestamp, data = parsed
        body = Event(id="", type=type_, timestamp=timestamp, data=data).body()
        digest = hashlib.sha256(payload).hexdigest()
        appended = await self._ingest(
            keys=[self._key, f"{self._key}:legacy:{digest}"],
            args=[self._maxlen, body, LEGACY_DEDUP_MS],
        )
        self._on_legacy("appended" if appended else "duplicate")
