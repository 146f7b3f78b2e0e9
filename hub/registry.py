"""Who is connected, across instances (``GET /admin/connections``).

Each instance answers for its own connections live, and, with the Redis backend, keeps a
snapshot of them in one hash (``<stream key>:connections``, field: its instance id) every
``HUB_CONNECTIONS_REGISTRY_S`` seconds; the listing reads the other instances' snapshots
from it. A snapshot names its time: one older than three intervals is an instance that
stopped without saying so, and is dropped (an instance that stops gracefully removes its
own). Bounded: a snapshot lists at most ``MAX_LISTED`` connections of its instance (and
says when it lists fewer than there are).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from hub.config import Settings
    from hub.connection import Subscriber

log = logging.getLogger("hub.registry")

MAX_LISTED = 10_000


def describe(conn: Subscriber, instance_id: str, subscription: list[str] | None) -> dict[str, Any]:
    principal = conn.principal
    return {
        "connection_id": getattr(conn, "connection_id", None) or getattr(conn, "sid", None),
        "user_id": principal.user_id, "tenant_id": principal.tenant,
        "transport": conn.transport, "instance_id": instance_id,
        "since": round(conn.since, 3), "expires_at": principal.expires_at,
        # None: every type (no subscribe yet)
        "subscription": subscription,
    }


class ConnectionRegistry:
    def __init__(self, settings: Settings, redis: aioredis.Redis | None,
                 connections: Callable[[], Iterable[Subscriber]],
                 subscription: Callable[[Subscriber], list[str] | None]) -> None:
        self._settings = settings
        self._redis = redis
        self._connections = connections
        self._subscription = subscription
        self._key = settings.stream_key + ":connections"
        self._interval = settings.connections_registry_s
        self._task: asyncio.Task[None] | None = None

    def local_connections(self) -> Iterable[Subscriber]:
        """This instance's open connections, of every transport."""
        return self._connections()

    def local(self) -> tuple[list[dict[str, Any]], int]:
        """This instance's connections (at most MAX_LISTED) and how many there are."""
        instance = self._settings.instance_id
        listed: list[dict[str, Any]] = []
        total = 0
        for conn in self._connections():
            total += 1
            if len(listed) < MAX_LISTED:
                listed.append(describe(conn, instance, self._subscription(conn)))
        return listed, total

    async def start(self) -> None:
        if self._redis is not None:
            self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        assert self._redis is not None
        # Bounded: a stop while Redis is down must not wait on it (the snapshot goes stale
        # and is left out by the others anyway).
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._redis.hdel(self._key, self._settings.instance_id), 1.0)

    async def _keep(self) -> None:
        assert self._redis is not None
        while True:
            listed, total = self.local()
            snapshot = orjson.dumps({"at": time.time(), "total": total, "connections": listed})
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hset(self._key, self._settings.instance_id, snapshot)
                    pipe.expire(self._key, int(self._interval * 3) + 1)
                    await asyncio.wait_for(pipe.execute(), max(1.0, self._interval))
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("could not store this instance's connections: %s", exc)
            await asyncio.sleep(self._interval)

    async def listing(self) -> dict[str, Any]:
        """Every instance's connections: this one's live, the others' last snapshot."""
        listed, total = self.local()
        instances: dict[str, Any] = {self._settings.instance_id: {
            "total": total, "listed": len(listed), "as_of": time.time()}}
        connections = list(listed)
        problems: list[str] = []
        if self._redis is not None:
            try:
                snapshots = await asyncio.wait_for(self._redis.hgetall(self._key), 2.0)
            except (RedisError, OSError, TimeoutError) as exc:
                snapshots = {}
                problems.append(f"other instances unknown: Redis unavailable ({exc})")
            stale_after = time.time() - self._interval * 3
            for raw_id, raw in snapshots.items():
                instance = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                if instance == self._settings.instance_id:
                    continue
                try:
                    snapshot = orjson.loads(raw)
                    at = float(snapshot["at"])
                    theirs = list(snapshot["connections"])
                    their_total = int(snapshot["total"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
                if at < stale_after:
                    continue
                instances[instance] = {"total": their_total, "listed": len(theirs),
                                       "as_of": at}
                connections.extend(theirs)
        return {"connections": connections, "instances": instances, "problems": problems}
