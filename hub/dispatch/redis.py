"""The Redis backend: a Redis Stream carries events between instances.

Every event is appended to one stream (``HUB_STREAM_KEY``) with ``XADD``; the stream id is
the event id, so ids are unique and ordered across the deployment and the stream doubles
as the resume history (trimmed to about ``HUB_HISTORY_SIZE``). Each instance reads the
stream from the last id it delivered: after a Redis outage it picks up where it stopped,
so nothing published meanwhile is lost or delivered twice.

python-socketio's own cross-instance channel keeps working beside it: the Socket.IO
server's client manager is an ``AsyncRedisManager``, so an external process emitting
through a write-only ``AsyncRedisManager`` reaches this instance's Socket.IO clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from hub.backoff import Backoff
from hub.dispatch.base import Backend, History
from hub.dispatch.manager import ConnectHookMixin, local_emit
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


def open_redis(url: str) -> aioredis.Redis:
    if url.startswith("redis+sentinel://"):
        from socketio.redis_manager import parse_redis_sentinel_url

        sentinels, service, kwargs = parse_redis_sentinel_url(url)
        sentinel = aioredis.Sentinel(sentinels, **kwargs)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(service or "mymaster")
        return master
    # Bounded timeouts: a vanished Redis must fail calls (and trigger the outage spool),
    # not hang them; XREAD blocks for 1 s, well inside the socket timeout.
    return aioredis.Redis.from_url(url, health_check_interval=10, socket_connect_timeout=5,
                                   socket_timeout=15)


class HubRedisManager(ConnectHookMixin, socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's Redis manager on hub's Redis client, with the encode-once emit."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        super().__init__(channel=channel)
        self._client = client

    def _redis_connect(self) -> None:
        self.redis = self._client
        self.pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _listen(self) -> Any:
        # The host's client may decode responses, so the channel may be str or bytes.
        async for message in self._redis_listen_with_retries():
            if message.get("type") == "message" and _str(message["channel"]) == self.channel:
                yield message["data"]

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        if message.get("callback") is not None or message.get("binary"):
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
        self._last_id = "0-0"
        # Liveness of each background loop; `connected` is the stream reader and legacy
        # subscriber being up (the spool flusher is idle while Redis is fine).
        self._alive: dict[str, bool] = {"stream": False, "legacy": not legacy_channel,
                                        "spool": True}
        self._instance_id = instance_id
        # Events published while Redis is unreachable: delivered locally at once, appended
        # to the stream (in order) when Redis returns.
        self._spool: deque[Event] = deque()
        self._spool_limit = history_size
        self._spool_ready = asyncio.Event()
        self._on_spool_overflow = on_spool_overflow
        self._provisional = (0, 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._manager = HubRedisManager(client, socketio_channel)
        self._ingest = client.register_script(_INGEST_ONCE)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, on_event: Callable[[Event], None]) -> None:
        self._on_event = on_event
        # Start reading after the newest event that exists now: older ones are history.
        newest = await self.redis.xrevrange(self._key, count=1)
        self._last_id = _str(newest[0][0]) if newest else "0-0"
        self._alive["stream"] = True
        self._tasks.append(asyncio.create_task(self._supervise(self._read_stream, "stream")))
        self._tasks.append(asyncio.create_task(self._supervise(self._flush_spool, "spool")))
        if self._legacy_channel:
            self._tasks.append(asyncio.create_task(self._supervise(self._read_legacy, "legacy")))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
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
        if not self._spool:  # while anything is spooled, later events queue behind it
            try:
                event.id = await append(self.redis, self._key, self._maxlen, event.body())
                return event
            except BackendUnavailable as exc:
                log.warning("redis unavailable (%s): spooling events, delivering locally", exc)
        return self._spool_event(event)

    def _spool_event(self, event: Event) -> Event:
        event.id = self._provisional_id()
        if len(self._spool) >= self._spool_limit:
            lost = self._spool.popleft()
            self._on_spool_overflow()
            log.error("outage spool full: event %s will not reach other instances", lost.id)
        self._spool.append(event)
        self._spool_ready.set()
        if self._on_event is not None:
            self._on_event(event)  # this instance's clients get it now
        return event

    def _provisional_id(self) -> str:
        # Stream-shaped and after everything seen so far; the flusher keeps this id when
        # Redis accepts it (always after a restart that lost the stream).
        seen = id_key(self._last_id)
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
                event = self._spool[0]
                fields = {"e": event.body(), "o": self._instance_id}
                try:
                    await self.redis.xadd(self._key, fields, id=event.id,
                                          maxlen=self._maxlen, approximate=True)
                except aioredis.ResponseError:
                    # The stream moved past this id meanwhile (Redis kept its data and
                    # another instance wrote first): take a fresh id.
                    await self.redis.xadd(self._key, fields, maxlen=self._maxlen,
                                          approximate=True)
                self._spool.popleft()
            self._spool_ready.clear()
            log.info("outage spool flushed to redis")

    async def history(self, after: str) -> History:
        try:
            entries = await self.redis.xrange(self._key, min="(" + after, max="+")
            info = await self.redis.xinfo_stream(self._key)
        except aioredis.ResponseError:
            # No stream yet: nothing was ever published, so nothing is missing either.
            return History(events=(), truncated=False, first_retained=None)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        events = [ev for ev in map(self._decode, entries) if ev is not None]
        first = info.get("first-entry")
        first_id = _str(first[0]) if first else None
        # Trimming leaves no trace but the first entry moving on: if the client's id is older
        # than the oldest retained one, events in between may be gone (the id itself was
        # trimmed). Conservative: it may say so when the gap held nothing.
        added = info.get("entries-added")  # Redis >= 7; older servers: assume trimming
        trimmed = added is None or added > info.get("length", 0)
        truncated = first_id is not None and trimmed and id_key(first_id) > id_key(after)
        return History(events=events, truncated=truncated, first_retained=first_id)

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
        while True:
            response = await self.redis.xread({self._key: self._last_id}, count=1000, block=1000)
            self._alive["stream"] = True
            for _stream, entries in response or ():
                for entry in entries:
                    self._last_id = _str(entry[0])
                    if _field(entry[1], "o") == self._instance_id:
                        continue  # spooled here during an outage: delivered locally then
                    event = self._decode(entry)
                    if event is not None and self._on_event is not None:
                        self._on_event(event)

    async def _read_legacy(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._legacy_channel)
            self._alive["legacy"] = True
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
