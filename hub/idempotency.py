"""``Idempotency-Key`` on ``POST /events``: a publisher that retries a request whose reply it
never got (a timeout, a dropped connection) gets the first reply again, with the same id,
instead of publishing the event twice.

Replies are remembered per publisher (the token's subject) and key, in Redis for 24 hours
when the hub has one (shared by every instance, so a retry may reach another instance), and
in a bounded memory map always (so retries still work while Redis is away). Two retries of
one key sent *concurrently* may both publish: the key recognises a retry of a request that
has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from typing import Any

import orjson
from redis.exceptions import RedisError

MAX_KEY_LENGTH = 255
TTL_S = 86_400
TIMEOUT_S = 2.0


class IdempotencyKeys:
    def __init__(self, redis: Any | None, prefix: str, local_limit: int = 10_000) -> None:
        self._redis = redis
        self._prefix = prefix
        self._local: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._limit = local_limit

    def scoped(self, publisher: str, key: str) -> str:
        return hashlib.sha256(f"{publisher}\0{key}".encode()).hexdigest()

    async def recall(self, scoped: str) -> dict[str, Any] | None:
        reply = self._local.get(scoped)
        if reply is not None or self._redis is None:
            return reply
        try:
            raw = await asyncio.wait_for(self._redis.get(self._prefix + scoped), TIMEOUT_S)
        except (RedisError, OSError, TimeoutError):
            return None  # Redis away: only this instance's memory answers
        return None if raw is None else dict(orjson.loads(raw))

    async def remember(self, scoped: str, reply: dict[str, Any]) -> None:
        local = self._local
        local[scoped] = reply
        local.move_to_end(scoped)
        if len(local) > self._limit:
            local.popitem(last=False)
        if self._redis is None:
            return
        # On failure it stays in memory only: a retry to another instance would publish again.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._redis.set(self._prefix + scoped, orjson.dumps(reply),
                                                   ex=TTL_S), TIMEOUT_S)
