"""``Publisher``: publish events from another process (the proxy) through Redis, without
running a hub server. The events reach every hub instance on that Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from hub.backoff import Backoff
from hub.config import Settings
from hub.dispatch.ledger import Ids
from hub.dispatch.redis import open_redis
from hub.dispatch.scripts import APPEND, append_event
from hub.errors import BackendUnavailable
from hub.events import Event, EventTypes, id_key, now_timestamp


class Publisher:
    """Validates and appends events to hub's Redis stream::

        async with Publisher("redis://localhost:6379/0") as publisher:
            event = await publisher.publish("threat_detected", {...})

    While Redis is unreachable, ``publish`` retries with jittered backoff for up to
    ``retry_for_s`` seconds, then raises :class:`~hub.errors.BackendUnavailable`.

    By default it is as strict as ``POST /events``: the spec's types (and
    ``extra_event_types``) only, each ``data`` checked against its schema. ``lenient=True``
    makes it a drop-in for the proxy's own ``publish_event``: any type name, any JSON
    object as ``data``, sent unchanged (hub instances deliver them as they do the
    proxy's channel, counting none of them; their ``HUB_MAX_EVENT_TYPES`` still applies).

    The event's id is chosen before the first attempt and every retry carries it, so a
    retry of an append that had in fact run (its reply lost) is recognised, not doubled.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: aioredis.Redis | None = None,
        stream_key: str = "hub:events",
        history_size: int = 10_000,
        extra_event_types: Iterable[str] = (),
        max_data_bytes: int = 64 * 1024,
        retry_for_s: float = 10.0,
        lenient: bool = False,
    ) -> None:
        if (redis_url is None) == (redis is None):
            raise ValueError("give either redis_url or redis")
        self._owns = redis is None
        self.redis = redis if redis is not None else open_redis(redis_url or "")
        self._key = stream_key
        self._shard_keys: list[str] = []  # a cluster: the stream of each shard
        if (redis_url or "").startswith("redis+cluster://"):
            from hub.dispatch.cluster import DEFAULT_SHARDS, parse_cluster_url, shard_keys

            shards = parse_cluster_url(redis_url or "")[1].get("shards", DEFAULT_SHARDS)
            self._shard_keys = shard_keys(stream_key, shards)
        self._maxlen = history_size
        self._lenient = lenient
        self._types = EventTypes(extra_event_types, open_types=lenient, max_types=1_000)
        self._max_data_bytes = max_data_bytes
        self._retry_for_s = retry_for_s
        self._ids = Ids()
        self._script = self.redis.register_script(APPEND)
        self._origin = "publisher-" + format(self._ids.salt, "x")

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Publisher:
        if not settings.redis_url:
            raise ValueError("Publisher needs REDIS_URL")
        return cls(settings.redis_url, stream_key=settings.stream_key,
                   history_size=settings.history_size,
                   extra_event_types=settings.extra_event_types,
                   max_data_bytes=settings.max_data_bytes, **kwargs)

    async def publish(self, type_: str, data: dict[str, Any]) -> Event:
        """Validate and publish one event; return it with its id."""
        if self._lenient:
            name, clean, _ = self._types.check_envelope(
                type_, data, max_bytes=self._max_data_bytes, strict=False)
        else:
            name, clean = self._types.validate(type_, data, max_bytes=self._max_data_bytes)
        event = Event(id=self._ids.next(_now_ms()), type=name, timestamp=now_timestamp(),
                      data=clean)
        deadline = time.monotonic() + self._retry_for_s
        backoff = Backoff(base=0.05, cap=2.0)
        key = self._key
        if self._shard_keys:
            from hub.dispatch.cluster import shard_of

            key = self._shard_keys[shard_of(name, len(self._shard_keys))]
        while True:
            try:
                outcome, detail = await append_event(self._script, key, self._maxlen,
                                                     event, self._origin, relocate=False)
            except (RedisError, OSError) as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise BackendUnavailable(f"redis unavailable: {exc}") from exc
                await asyncio.sleep(delay)
                continue
            if outcome != "stale":
                return event
            # Nothing was appended: the stream had moved past the id; take a later one.
            self._ids.learn(id_key(detail))
            event = Event(id=self._ids.next(_now_ms()), type=name,
                          timestamp=event.timestamp, data=clean)

    async def aclose(self) -> None:
        if self._owns:
            await self.redis.aclose()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)
