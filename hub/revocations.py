"""Token revocation that takes effect on every instance at once (README "Revocation").

A revocation names one of ``user_id``, ``jti`` or ``tenant_id``. It covers the tokens
issued up to the moment it was made (by ``iat``; a token without ``iat`` is covered) for
a user or a tenant, and the one token with that ``jti``; a token issued afterwards
passes. It lasts as long as a covered token can: ``HUB_MAX_TOKEN_LIFETIME_S`` plus the
leeway, after which every token it covers has expired anyway, and it is forgotten.

Each instance keeps the revocations in memory, where the connect check and the refresh
check read them (no Redis call per connection). With the Redis backend they also live
in a hash (``<stream key>:revocations``, field ``kind:value``, the whole key expiring
with the newest entry) and each one is announced on a pub/sub channel
(``<stream key>:revocations:notice``): every instance applies it on the notice, within
the channel's latency, and reloads the hash whenever its subscription (re)starts, so a
notice missed during an outage is caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio.cluster import RedisCluster

from hub.backoff import Backoff
from hub.dispatch.redis import subscribe

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from hub.auth import Principal
    from hub.config import Settings

log = logging.getLogger("hub.revocations")
audit = logging.getLogger("hub.audit")

MAX_VALUE_LENGTH = 256
# Revocations held at once: a bound, so a flood of revocations cannot take the memory.
MAX_REVOCATIONS = 100_000


class Kind(enum.StrEnum):
    USER_ID = "user_id"
    JTI = "jti"
    TENANT_ID = "tenant_id"


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: Kind
    value: str
    at: float  # when it was made: user and tenant tokens issued after it pass
    expires_at: float  # when every token it covers has expired: it is forgotten then
    by: str  # the user who asked (for the audit log and the listing)
    instance_id: str  # the instance that took the request
    reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.value}"

    def covers(self, principal: Principal) -> bool:
        if self.kind is Kind.JTI:
            return principal.jti == self.value
        subject = principal.user_id if self.kind is Kind.USER_ID else principal.tenant
        if subject != self.value:
            return False
        # Issued up to the revocation (whole seconds, as iat is): covered.
        return principal.issued_at is None or principal.issued_at <= self.at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Revocation | None:
        try:
            data = orjson.loads(raw)
            return cls(kind=Kind(data["kind"]), value=str(data["value"]),
                       at=float(data["at"]), expires_at=float(data["expires_at"]),
                       by=str(data["by"]), instance_id=str(data["instance_id"]),
                       reason=str(data.get("reason", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class Revocations:
    """This instance's view of the revocations, and how they reach the other instances.

    ``apply`` is called with each revocation as it becomes known here (made here, or
    announced by another instance): it closes the matching connections."""

    def __init__(self, settings: Settings, redis: aioredis.Redis | None,
                 apply: Callable[[Revocation], None]) -> None:
        self._settings = settings
        self._redis = redis
        self._apply = apply
        self._entries: dict[str, Revocation] = {}
        self._hash = settings.stream_key + ":revocations"
        self._channel = settings.stream_key + ":revocations:notice"
        self._lifetime = settings.max_token_lifetime_s + settings.jwt_leeway_s
        self._task: asyncio.Task[None] | None = None
        self._first_try = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._redis is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._listen())
        # Only the first attempt is waited for, briefly: an instance starts while Redis is
        # down too (the listener keeps trying, and loads the hash once it is subscribed).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_try.wait(), 2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the check ----------------------------------------------------------------------
    def check(self, principal: Principal) -> Revocation | None:
        """The revocation covering this token, if any (expired ones are forgotten)."""
        if not self._entries:
            return None
        now = time.time()
        for key in (f"{Kind.JTI}:{principal.jti}" if principal.jti is not None else None,
                    f"{Kind.USER_ID}:{principal.user_id}",
                    f"{Kind.TENANT_ID}:{principal.tenant}" if principal.tenant else None):
            if key is None:
                continue
            revocation = self._entries.get(key)
            if revocation is None:
                continue
            if revocation.expires_at <= now:
                del self._entries[key]
                continue
            if revocation.covers(principal):
                return revocation
        return None

    def listing(self) -> list[dict[str, Any]]:
        now = time.time()
        for key in [k for k, r in self._entries.items() if r.expires_at <= now]:
            del self._entries[key]
        return [r.as_dict() for r in sorted(self._entries.values(), key=lambda r: r.at)]

    # -- making one ---------------------------------------------------------------------
    async def revoke(self, kind: Kind, value: str, by: str, reason: str = "") -> Revocation:
        """Revoke (raises redis errors when Redis cannot store it: nothing is applied then,
        so an instance never believes in a revocation the others will not see)."""
        now = time.time()
        revocation = Revocation(kind=kind, value=value, at=now,
                                expires_at=now + self._lifetime, by=by,
                                instance_id=self._settings.instance_id, reason=reason)
        if self._redis is not None:
            raw = orjson.dumps(revocation.as_dict())
            # A cluster client refuses PUBLISH in a pipeline: it goes after the hash there,
            # through the node that stored it (a PUBLISH on any node reaches the whole
            # cluster; redis-py would send it to the master of the channel's slot, which
            # may be down while the hash's is not).
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._hash, revocation.key, raw)
                # The whole hash expires with its newest entry (entries past their own
                # expiry are dropped when read).
                pipe.expire(self._hash, int(self._lifetime) + 1)
                if not isinstance(self._redis, RedisCluster):
                    pipe.publish(self._channel, raw)
                try:
                    await asyncio.wait_for(pipe.execute(), 5)
                    if isinstance(self._redis, RedisCluster):
                        node = self._redis.get_node_from_key(self._hash)
                        await asyncio.wait_for(
                            self._redis.publish(self._channel, raw, target_nodes=node), 5)
                except TimeoutError:
                    raise OSError("Redis did not answer within 5 s") from None
        audit.warning("revocation: %s %s revoked by %s on %s%s", kind.value, value, by,
                      self._settings.instance_id, f" ({reason})" if reason else "")
        self._learn(revocation)
        return revocation

    def _learn(self, revocation: Revocation) -> None:
        if revocation.expires_at <= time.time():
            return
        known = self._entries.get(revocation.key)
        if known is not None and known.at >= revocation.at:
            return  # already applied (our own notice coming back, or a reload)
        if known is None and len(self._entries) >= MAX_REVOCATIONS:
            self.listing()  # forget expired ones first
            if len(self._entries) >= MAX_REVOCATIONS:
                log.error("more than %d revocations at once: %s %s not kept (it still "
                          "closed the matching connections)", MAX_REVOCATIONS,
                          revocation.kind.value, revocation.value)
                self._apply(revocation)
                return
        self._entries[revocation.key] = revocation
        self._apply(revocation)

    # -- the other instances ------------------------------------------------------------
    async def _listen(self) -> None:
        assert self._redis is not None
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            pubsub: Any = None
            try:
                try:
                    pubsub = await asyncio.wait_for(subscribe(self._redis, self._channel), 5)
                    # After subscribing: nothing falls between the two.
                    await asyncio.wait_for(self._reload(), 5)
                finally:
                    self._first_try.set()
                backoff.reset()
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None or message.get("type") != "message":
                        continue
                    revocation = Revocation.from_json(message["data"])
                    if revocation is None:
                        log.warning("ignoring a malformed revocation notice")
                        continue
                    if revocation.instance_id != self._settings.instance_id:
                        audit.warning("revocation: %s %s revoked by %s on %s (applied here)",
                                      revocation.kind.value, revocation.value, revocation.by,
                                      revocation.instance_id)
                    self._learn(revocation)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or the connection lost: retry
                log.warning("revocation notices: %s; retrying", exc)
                await asyncio.sleep(backoff.next_delay())
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), 1)

    async def _reload(self) -> None:
        assert self._redis is not None
        entries = await self._redis.hgetall(self._hash)
        now = time.time()
        gone = []
        for field, raw in entries.items():
            revocation = Revocation.from_json(raw)
            if revocation is None or revocation.expires_at <= now:
                gone.append(field)  # expired (or unreadable): the hash stays bounded
                continue
            self._learn(revocation)
        if gone:
            await self._redis.hdel(self._hash, *gone)
