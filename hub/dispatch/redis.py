"""The Redis backend: a Redis Stream carries events between instances.

Every event is appended to one stream (``HUB_STREAM_KEY``) under the id chosen where it was
published (``hub.dispatch.ledger.Ids``); that id is the one its publish returned and the one
every client sees, and the stream doubles as the resume history (trimmed to about
``HUB_HISTORY_SIZE``). Each instance reads the stream from the last entry it read and
delivers each id once. While Redis (or this instance's reader) is down or refuses writes,
what this instance publishes is fsynced to its journal (``hub.dispatch.journal``),
delivered to its own clients at once, and appended when Redis returns. The rules live in
``hub.dispatch.ledger`` (no I/O); this module runs the commands.

Health is measured, not assumed: the last write's outcome, how far the reader trails the
stream head, and a marker each instance appends and reads back (never delivered).

This backend knows no transport. python-socketio's own cross-instance channel keeps
working beside it: the Socket.IO transport builds its ``AsyncRedisManager`` on this
backend's client (hub.transports.sio_manager), so an external process emitting through a
write-only ``AsyncRedisManager`` reaches this instance's Socket.IO clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import unquote_plus, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from hub.backoff import Backoff
from hub.config import Settings
from hub.dispatch.base import Backend, History
from hub.dispatch.journal import Journal, JournalFull, default_journal_dir
from hub.dispatch.ledger import Ledger, format_id, positioned
from hub.dispatch.scripts import (
    APPEND,
    CLAIM_LEGACY,
    EPOCH_SUFFIX,
    LEGACY_ALIGN_MS,
    LEGACY_LOG,
    LEGACY_SUFFIX,
    MOVED_SUFFIX,
    SYNC_SUFFIX,
    append_event,
)
from hub.errors import BackendUnavailable
from hub.events import Event, id_key

log = logging.getLogger("hub.redis")

LegacyParser = Callable[[bytes], tuple[str, str, dict[str, Any]] | None]

# Health: a refused or frozen Redis shows within HEALTH_WINDOW_S plus a marker interval.
HEALTH_WINDOW_S = 2.0
MARKER_INTERVAL_S = 0.5
COMMAND_TIMEOUT_S = 2.0  # no command holds a publish longer (then it is journalled)
SOCKET_TIMEOUT_S = 2.5  # above XREAD's block, below what a client would wait for a 202
READ_BLOCK_MS = 500
READ_COUNT = 1000

def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Any, name: str) -> str | None:
    value = fields.get(name.encode(), fields.get(name))
    return None if value is None else _str(value)


def journal_for(settings: Settings, client: Any) -> Journal:
    """The journal of an instance on ``client``'s Redis and ``settings.stream_key``: one
    directory per Redis and stream, so instances adopt only journals meant for their Redis."""
    kwargs = client.connection_pool.connection_kwargs
    where = (f"{kwargs.get('host', '')}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
             f"{kwargs.get('path', '')}|{settings.stream_key}")
    base = Path(settings.journal_dir) if settings.journal_dir else default_journal_dir()
    directory = base / hashlib.sha256(where.encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.instance_id)
    return Journal(directory, f"{name}-{os.getpid()}", settings.journal_max_events)


# A command that finds every pooled connection in use waits this long for one (redis-py's
# default pool raises at once: a burst of resumes was refused for lack of connections).
POOL_WAIT_S = 2.0
STOP_WAIT_S = 5.0  # how long stop() waits for its cancelled loops


# "Acknowledged means on a replica": an append waits for ``wait_replicas`` replicas to
# confirm it (``WAIT``), at most ``wait_ms``; the URL query options, on every Redis URL.
WAIT_BOUNDS = {"wait_replicas": (0, 8), "wait_ms": (1, 10_000)}
DEFAULT_WAIT_MS = 200


def url_options(query: str, bounds: Mapping[str, tuple[int, int]], what: str, *,
                others: bool = False) -> tuple[dict[str, int], str]:
    """The options of ``bounds`` that the URL query ``query`` sets, each a number within
    its bounds, and the rest of the query as it was written. An option not in ``bounds``
    is a ValueError naming ``what`` (the URL's kind), unless ``others`` (a ``redis://``
    URL's query also carries redis-py's own options, which are left to it)."""
    options: dict[str, int] = {}
    rest = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = (unquote_plus(s) for s in part.partition("="))
        if name not in bounds and others:
            rest.append(part)
            continue
        if name not in bounds:
            raise ValueError(f"Invalid {what} option {name!r} (known: {', '.join(bounds)})")
        low, high = bounds[name]
        if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
            raise ValueError(f"{what} option {name} must be a number in {low}..{high}, "
                             f"not {value!r}")
        options[name] = int(value)
    return options, "&".join(rest)


class WaitOptions(TypedDict):
    wait_replicas: int
    wait_ms: int


def wait_options(url: str) -> tuple[str, WaitOptions]:
    """A one-node (``redis://``, ``rediss://``, ``unix://``) or ``redis+sentinel://`` URL
    without hub's own query options, for redis-py, and those options (``wait_replicas``:
    default 1 for Sentinel, whose point is a replica to fail over to, 0 otherwise, a single
    Redis usually having none; ``wait_ms``). A bad option is a ValueError."""
    base, _, query = url.partition("?")
    sentinel = urlsplit(url).scheme in {"redis+sentinel", "valkey+sentinel"}
    what = "Redis Sentinel URL" if sentinel else "Redis URL"
    # A Sentinel URL's query was never read (python-socketio's format has none): anything
    # else there is a mistake. A redis:// query also holds redis-py's options.
    options, rest = url_options(query, WAIT_BOUNDS, what, others=not sentinel)
    return (f"{base}?{rest}" if rest else base,
            WaitOptions(wait_replicas=options.get("wait_replicas", 1 if sentinel else 0),
                        wait_ms=options.get("wait_ms", DEFAULT_WAIT_MS)))


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str | None, dict[str, Any]]:
    """``redis+sentinel://[:password]@host1:port1,host2:port2,.../db/service_name``: the
    sentinels, the service name and the client's keyword arguments (python-socketio's
    format, so one URL serves both)."""
    parsed = urlsplit(url)
    if parsed.scheme not in {"redis+sentinel", "valkey+sentinel"}:
        raise ValueError("Invalid Redis Sentinel URL")
    sentinels = []
    for host_port in parsed.netloc.split("@")[-1].split(","):
        host, port = host_port.rsplit(":", 1)
        sentinels.append((host, int(port)))
    kwargs: dict[str, Any] = {}
    if parsed.username:
        kwargs["username"] = parsed.username
    if parsed.password:
        kwargs["password"] = parsed.password
    service = None
    parts = parsed.path.split("/") if parsed.path else []
    if len(parts) >= 2 and parts[1] != "":
        kwargs["db"] = int(parts[1])
    if len(parts) >= 3 and parts[2] != "":
        service = parts[2]
    return sentinels, service, kwargs


def open_redis(url: str, max_connections: int = 100) -> aioredis.Redis:
    # Short timeouts: a vanished or frozen Redis must fail calls (the journal takes the
    # events) within health's window, not hang them; XREAD blocks for 0.5 s, inside the
    # socket timeout. One immediate retry on a fresh connection when a pooled one turns out
    # closed (as after a Redis restart or a failover): without it the first command on each
    # stale connection fails. Appends are idempotent by event id, so a retry never doubles
    # one.
    options: dict[str, Any] = {
        "health_check_interval": 10, "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "retry_on_error": [RedisConnectionError]}
    if url.startswith("redis+cluster://"):
        from hub.dispatch.cluster import open_cluster  # its module imports this one

        # The commands hub sends work on both (each touches one slot).
        cluster: aioredis.Redis = open_cluster(url, max_connections)  # type: ignore[assignment]
        return cluster
    # Without hub's own query options (RedisBackend takes them): redis-py would pass them
    # on to its connections as keyword arguments, which they refuse.
    url, _ = wait_options(url)
    if url.startswith("redis+sentinel://"):
        sentinels, service, kwargs = parse_sentinel_url(url)
        # The same bounds for the master's connections (a frozen master must fail calls as
        # a frozen single Redis does), and for the questions to the sentinels.
        sentinel = aioredis.Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs={"socket_timeout": SOCKET_TIMEOUT_S,
                                        "socket_connect_timeout": SOCKET_TIMEOUT_S},
            **{**options, **kwargs})
        master: aioredis.Redis = sentinel.master_for(service or "mymaster",
                                                     max_connections=max_connections)
        return master
    # A blocking pool: past ``max_connections`` in use, a command waits for one to be
    # released instead of failing (history reads are bounded apart, see history()).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **options)
    return aioredis.Redis.from_pool(pool)


class NodePubSub(aioredis.client.PubSub):
    """A subscription on a connection of its own to one node of a cluster, outside the
    cluster client's pools: redis-py's ``ClusterPubSub`` borrows a node's pooled
    connection, which the client closes with all the others whenever a node answers
    CLUSTERDOWN (as every one does while a failed master's slots are uncovered), so
    every subscription would drop, and lose what is published meanwhile, in any failover."""

    async def aclose(self) -> None:
        await super().aclose()  # type: ignore[no-untyped-call]
        await self.connection_pool.disconnect()


async def subscribe(client: Any, channel: str) -> Any:
    """A PubSub of ``client`` subscribed to ``channel`` (its subscribe messages ignored).

    On a Redis Cluster a PUBLISH on any node reaches the subscribers of every node, so a
    subscription may be on any node: on the first that takes the SUBSCRIBE, the master of
    the channel's slot (as the client's slot map says) first, then the map's other nodes
    in the order of their names, so every instance picks the same node; a
    :class:`NodePubSub`. redis-py's own choice, that master alone, stays on it when it dies
    until something reads the slot map again (nothing may: the node need hold nothing
    else of this instance's), and the map need not list replicas (Redis leaves out those
    that have replicated nothing)."""
    if not isinstance(client, RedisCluster):
        return await _subscribed(client.pubsub(ignore_subscribe_messages=True), channel)
    first = client.nodes_manager.slots_cache.get(client.keyslot(channel), [])
    nodes = [*first, *sorted((n for n in client.get_nodes() if n not in first),
                             key=lambda n: n.name)]
    error: Exception = ClusterError(f"no cluster node known to subscribe to {channel!r} on")
    for node in nodes:
        pool = aioredis.ConnectionPool(connection_class=node.connection_class,
                                       **node.connection_kwargs)
        try:
            return await _subscribed(NodePubSub(connection_pool=pool, encoder=client.encoder,
                                                ignore_subscribe_messages=True), channel)
        except (RedisError, OSError) as exc:
            error = exc
    raise error


async def _subscribed(pubsub: Any, channel: str) -> Any:
    try:
        await pubsub.subscribe(channel)
    except BaseException:
        await pubsub.aclose()
        raise
    return pubsub


class RedisBackend(Backend):
    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        owns_client: bool,
        stream_key: str,
        history_size: int,
        legacy_channel: str,
        legacy_parser: LegacyParser,
        instance_id: str,
        journal: Journal | None = None,
        on_reconnect: Callable[[], None] = lambda: None,
        on_journal_full: Callable[[], None] = lambda: None,
        on_legacy: Callable[[str], None] = lambda result: None,
        history_concurrency: int = 8,
        on_health: Callable[[dict[str, float]], None] = lambda values: None,
        on_malformed: Callable[[], None] = lambda: None,
        health_window_s: float = HEALTH_WINDOW_S,
        marker_interval_s: float = MARKER_INTERVAL_S,
        wait_replicas: int = 0,
        wait_ms: int = DEFAULT_WAIT_MS,
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
        self._on_health = on_health
        self._on_malformed = on_malformed
        self._on_journal_full = on_journal_full
        self._on_event: Callable[[Event], None] | None = None
        self._batch: Callable[[], AbstractContextManager[None]] = nullcontext
        # Liveness of each background loop; the spool flusher is idle while Redis is fine.
        self._alive: dict[str, bool] = {"stream": False, "legacy": not legacy_channel,
                                        "spool": True, "health": True}
        self._instance_id = instance_id
        # Resumes queue here rather than take every pooled connection (or fail for lack of
        # one): a reconnect storm costs at most this many connections at a time.
        self._history_slots = asyncio.Semaphore(history_concurrency)
        self.ledger = Ledger(seen_limit=2 * history_size + (journal.max_events if journal
                                                            else history_size),
                             recent_limit=min(history_size, 10_000))
        self.journal = journal
        self._spool_ready = asyncio.Event()
        self._flushed = asyncio.Event()  # set while nothing is pending
        self._tail_unknown = True  # where the reader starts: after the newest entry
        self._moved_exists = True  # whether <stream>:moved may name ids (checked at start)
        self._epoch: str | None = None  # changes when Redis loses its data
        self._generation = 0  # bumped by a reset, to discard an XREAD reply in flight
        # Health: the write path, the read path, the round trip (see problems()).
        self._window = health_window_s
        self._marker_interval = marker_interval_s
        self._write_error: str | None = None
        now = time.monotonic()
        self._caught_up_at = now  # the reader last reached the head of the stream
        self._marker_seq = 0
        self._marker_out: tuple[int, float] | None = None  # (oldest unseen seq, sent at)
        self._marker_back: list[str] = []  # own markers read back, to delete
        self.round_trip_s = 0.0
        self._malformed_logged = -60.0
        self._journal_full_logged = -60.0
        self.loops: dict[str, asyncio.Task[None]] = {}  # the background loops, by name
        self._legacy_pubsub: Any = None  # subscribed at start, until the loop takes it
        self._legacy_sub = ""  # this subscription's name in the claim script
        self._legacy_n = 0  # messages received on this subscription
        self._legacy_since_ms = 0  # Redis time just before it subscribed
        self._append_script = client.register_script(APPEND)
        self._claim = client.register_script(CLAIM_LEGACY)
        # Acknowledged means on a replica (see _append); 0: on the master alone.
        self._wait_replicas = wait_replicas
        self._wait_ms = wait_ms
        self._replicas = wait_replicas  # connected replicas, as the master last said

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, on_event: Callable[[Event], None],
                    batch: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self._on_event = on_event
        self._batch = batch
        if self.journal is not None:
            adopted = self.journal.open()
            self.ledger.adopt(adopted)
            if adopted:
                self._wake_flusher()
        try:
            await self._find_tail()
            await self._check_epoch()
            # Redis answers: publishes take the stream path from the first one (the reader
            # loop, about to start, reads from here).
            self.ledger.reader_back()
            self._alive["stream"] = True
        except (RedisError, OSError, TimeoutError) as exc:
            # Start serving anyway: local clients are served, publishes are journalled,
            # and the loops catch up when Redis answers.
            log.warning("redis unavailable at start-up (%s): starting degraded", exc)
        loops = {"stream": self._read_stream, "spool": self._flush_spool,
                 "health": self._health_loop}
        if self._legacy_channel:
            with contextlib.suppress(RedisError, OSError):
                self._legacy_pubsub = await self._subscribe_legacy()
            loops["legacy"] = self._read_legacy
        for name, loop in loops.items():
            self.loops[name] = asyncio.create_task(self._supervise(loop, name),
                                                    name=f"redis-{name}")

    async def drain(self, timeout: float) -> None:
        """Graceful stop: give the flusher up to ``timeout`` to empty the journal; log what
        it leaves (kept on disk for the next instance)."""
        if self.ledger.pending:
            self._wake_flusher()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), timeout)
        if self.ledger.pending:
            log.error("stopping with %d acknowledged event(s) not in redis yet (first %s); "
                      "they stay in the journal %s for the next instance on this host",
                      len(self.ledger.pending), self.ledger.pending[0].id,
                      self.journal.path if self.journal else "(none)")

    async def stop(self) -> None:
        for task in self.loops.values():
            task.cancel()
        if self.loops:
            # Bounded: a task cancelled inside a blocking XREAD has been seen never to
            # finish (the cancellation lost in redis-py); shutdown must not hang on it.
            done, stuck = await asyncio.wait(self.loops.values(), timeout=STOP_WAIT_S)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: a loop's last error was logged by it
            for task in stuck:
                log.warning("redis loop %s did not stop within %.0fs of its cancellation; "
                            "leaving it", task.get_name(), STOP_WAIT_S)
        self.loops.clear()
        if self.journal is not None:
            self.journal.close()
        if self._legacy_pubsub is not None:  # its loop never got to take it
            await self._legacy_pubsub.aclose()
            self._legacy_pubsub = None
        if self._owns_client:
            await self.redis.aclose()

    @property
    def connected(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """Why this instance is not fully healthy, worst first; empty when it is. Computed
        from what the loops last saw: answering it never waits on Redis."""
        now = time.monotonic()
        reasons = []
        if not self._alive["stream"]:
            reasons.append("redis stream reader is reconnecting")
        elif now - self._caught_up_at > self._window:
            reasons.append(f"redis stream reader is {now - self._caught_up_at:.1f}s behind "
                           "the stream head (redis frozen or the reader stuck)")
        if self._write_error is not None:
            reasons.append(f"redis refused the last write: {self._write_error}")
        if self._marker_out is not None and now - self._marker_out[1] > self._window:
            reasons.append(f"health marker not read back after {now - self._marker_out[1]:.1f}s")
        if not self._alive["legacy"]:
            reasons.append("legacy channel subscriber is reconnecting")
        pending = len(self.ledger.pending)
        if pending:
            reasons.append(f"{pending} acknowledged event(s) in the local journal, "
                           "not in redis yet")
        return reasons

    @property
    def subscribed(self) -> bool:
        """The stream reader and the legacy subscriber are up (``redis_connected``)."""
        return self._alive["stream"] and self._alive["legacy"]

    def status(self) -> dict[str, Any]:
        return {"stream": self._key, "last_id": format_id(self.ledger.last_read),
                "alive": dict(self._alive), "spooled": len(self.ledger.pending),
                "journal": len(self.journal) if self.journal else 0,
                "reader_lag_s": round(self.reader_lag_s, 3),
                "round_trip_s": round(self.round_trip_s, 4)}

    @property
    def reader_lag_s(self) -> float:
        return max(0.0, time.monotonic() - self._caught_up_at)

    # -- events -------------------------------------------------------------------------
    async def publish(self, type_: str, timestamp: str, data: dict[str, Any]) -> Event:
        ledger = self.ledger
        event = Event(id=ledger.new_id(_now_ms()), type=type_, timestamp=timestamp, data=data)
        if not ledger.must_spool:
            chosen = [event]
            try:
                await self._append_normal(chosen)
            except (RedisError, OSError, TimeoutError) as exc:
                event = chosen[0]
                # Failed or unknown (a timeout: it may still run). Either way the event
                # keeps its id: appending it again later is recognised by that id.
                self._wrote(exc)
                log.warning("redis unavailable (%s): journalling events, delivering "
                            "locally", exc)
            else:
                event = chosen[0]
                self._wrote(None)
                self._deliver_all(ledger.appended(event))
                return event
        self._deliver_all(ledger.take_over())
        if self.journal is not None:
            try:
                self.journal.append(event)
            except JournalFull:
                self._on_journal_full()
                now = time.monotonic()
                if now - self._journal_full_logged >= 10:  # every refusal is counted
                    self._journal_full_logged = now
                    log.error("outage journal full (%d events): refusing publishes (503) "
                              "until redis takes them", len(self.journal))
                raise
        fresh = ledger.spool(event)
        event.shared = False
        self._wake_flusher()
        if fresh:
            self._deliver_local(event)
        return event

    async def _append_normal(self, chosen: list[Event]) -> None:
        """Append ``chosen[0]`` at its id, choosing a later one while the stream has moved
        past it (nothing was appended then, so the id is still free to change). ``chosen``
        holds the event as last sent, so that on a timeout the caller journals the id the
        command in flight carries."""
        for _ in range(100):
            event = chosen[0]
            outcome, detail = await asyncio.wait_for(self._append(event, relocate=False),
                                                     COMMAND_TIMEOUT_S)
            if outcome == "reset":
                await self._check_epoch()
                raise RedisError("redis lost its data: appending recent events again first")
            if outcome != "stale":
                return
            self.ledger.stale(detail)
            chosen[0] = Event(id=self.ledger.new_id(_now_ms()), type=event.type,
                              timestamp=event.timestamp, data=event.data)
        raise RedisError("the stream kept moving past every proposed id")

    async def _append(self, event: Event, *, relocate: bool) -> tuple[str, str]:
        """One run of the append script (``hub.dispatch.scripts.APPEND``) for ``event``;
        with ``wait_replicas``, confirmed by a replica: else a RedisError (the outcome is
        unknown to the caller, which journals the event and appends it again by id)."""
        if self._wait_replicas <= 0:
            return await append_event(self._append_script, self._key, self._maxlen, event,
                                      self._instance_id, relocate=relocate,
                                      epoch=self._epoch)
        # The script, then WAIT on the same connection (WAIT counts the replicas that have
        # every write this connection made), in one round trip. A retry that finds the
        # event present writes nothing, so a counter is written too: its acknowledgement
        # covers the event. ROLE says whether the node is still the master, and how many
        # replicas it has: while it has none (right after a failover, until the old master
        # rejoins as its replica) appends are acknowledged on it alone, not refused.
        wanted = min(self._wait_replicas, self._replicas)
        keys = [self._key, self._key + MOVED_SUFFIX, self._key + EPOCH_SUFFIX]
        args = [self._maxlen, event.id, event.body(), self._instance_id,
                "1" if relocate else "0", self._epoch or ""]
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", self._append_script.sha, len(keys), *keys, *args),
            *([("INCR", self._key + SYNC_SUFFIX)] if relocate else []),
            ("ROLE",), ("WAIT", wanted, self._wait_ms)]
        node, replies = await self._send(commands)
        if isinstance(replies[0], NoScriptError):
            await self.redis.script_load(self._append_script.script)
            commands[0] = ("EVAL", self._append_script.script, len(keys), *keys, *args)
            node, replies = await self._send(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                # MOVED (a failover moved the slot), CLUSTERDOWN, READONLY, OOM: the
                # outcome is unknown to the caller, which journals the event.
                await self._master_lost()
                raise reply
        result, role, acked = replies[0], replies[-2], replies[-1]
        if not role or _str(role[0]) != "master":
            await self._master_lost()
            raise RedisError(f"{node} is no longer the master of {self._key}")
        self._replicas = len(role[2])
        if int(acked) < wanted:
            raise RedisError(f"no replica of {node} confirmed the append within "
                             f"{self._wait_ms} ms")
        return _str(result[0]), _str(result[1])

    async def _send(self, commands: list[tuple[Any, ...]]) -> tuple[str, list[Any]]:
        """Send ``commands`` in one pipeline (not a transaction) on one connection to the
        master: which node that was, and each reply (an error reply as its exception)."""
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies = await pipe.execute(raise_on_error=False)
        pool = self.redis.connection_pool
        # A Sentinel master: the address the sentinels last named; else the URL's.
        address = getattr(pool, "master_address", None) or (
            pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port"))
        return pool.connection_kwargs.get("path") or f"{address[0]}:{address[1]}", replies

    async def _master_lost(self) -> None:
        """The master refused an append or said it is a master no longer: a Sentinel
        client asks the sentinels now (its pool then drops the old master's connections:
        redis-py does so by itself only for READONLY replies)."""
        pool = self.redis.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            with contextlib.suppress(RedisError, OSError):
                await pool.get_master_address()  # type: ignore[no-untyped-call]

    def _wrote(self, error: BaseException | None) -> None:
        if error is None:
            self._write_error = None
        elif isinstance(error, TimeoutError) or not str(error):
            self._write_error = f"no reply within {COMMAND_TIMEOUT_S:.0f}s"
        else:
            self._write_error = f"{type(error).__name__}: {error}"[:200]

    def _deliver_all(self, events: list[Event]) -> None:
        """Deliver events the ledger hands back; journal those it made pending."""
        pending = self.ledger.take_new_pending()
        if pending:
            for event in pending:
                event.shared = False
            if self.journal is not None:
                try:
                    self.journal.append_many(pending, force=True)
                except BackendUnavailable as exc:
                    log.error("cannot journal %d taken-over event(s): %s", len(pending), exc)
            self._wake_flusher()
        for event in events:
            self._deliver_local(event)

    def _wake_flusher(self) -> None:
        self._flushed.clear()
        self._spool_ready.set()

    def _deliver_local(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def _flush_spool(self) -> None:
        backoff = Backoff(base=0.05, cap=1.0)
        while True:
            await self._spool_ready.wait()
            flushed = 0
            while self.ledger.pending:
                event = self.ledger.pending[0]
                try:
                    outcome, _ = await asyncio.wait_for(self._append(event, relocate=True),
                                                        COMMAND_TIMEOUT_S)
                    if outcome == "reset":
                        await self._check_epoch()
                        continue
                except (RedisError, OSError, TimeoutError) as exc:
                    self._wrote(exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                self._wrote(None)
                self.ledger.flushed(event)
                event.shared = True
                if self.journal is not None:
                    self.journal.done(event.id)
                flushed += 1
            self._spool_ready.clear()
            self._flushed.set()
            if flushed:
                log.info("outage journal flushed to redis: %d event(s)", flushed)

    async def history(self, after: str, limit: int | None = None) -> History:
        # From ``after`` itself: when that entry is still there, nothing after it was
        # trimmed, so the common resume (from an id the client saw) is one XRANGE, with no
        # XINFO. ``limit + 2``: the entry itself may come first, and one more than the page
        # says whether more follow.
        count = None if limit is None else limit + 2
        try:
            async with self._history_slots:
                after = await self.position_of(after)  # an event appended after an outage
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

    async def latest(self, limit: int, before: str | None = None) -> History:
        """XREVRANGE: the newest entries first (before ``before``, exclusive), returned
        oldest first. Health markers and malformed entries count as read, not as events."""
        try:
            async with self._history_slots:
                entries = await self.redis.xrevrange(
                    self._key, max="+" if before is None else "(" + before, min="-",
                    count=limit + 1)
                oldest = (await self.redis.xrange(self._key, min="-", max="+", count=1)
                          if before is None else [])
        except aioredis.ResponseError:
            return History(events=(), truncated=False, first_retained=None)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        more = len(entries) > limit
        entries = entries[:limit]
        entries.reverse()
        events = [ev for ev in map(self._decode, entries) if ev is not None]
        return History(events=events, truncated=False, more=more,
                       first_retained=_str(oldest[0][0]) if oldest else None,
                       last_id=_str(entries[0][0]) if entries else None,
                       head_id=_str(entries[-1][0]) if entries else None)

    async def position_of(self, event_id: str) -> str:
        """Where ``event_id`` sits in the stream: itself, except for an event appended after
        an outage behind entries with later ids (the append script records those)."""
        if not self._moved_exists:
            return event_id  # no event has landed late here: spare resumes a Redis call
        moved = await self.redis.hget(self._key + MOVED_SUFFIX, event_id)
        return event_id if moved is None else _str(moved)

    def _decode(self, entry: Any) -> Event | None:
        """The event an entry holds, with its id (``i`` when it was appended late) and its
        stream position as sort key; None for a health marker or a malformed entry."""
        raw_id, fields = entry
        position = _str(raw_id)
        if _field(fields, "m") is not None:
            return None
        body = fields.get(b"e", fields.get("e"))
        try:
            event = Event.from_body(_field(fields, "i") or position, body)
            if (not isinstance(event.data, dict) or not isinstance(event.type, str)
                    or not isinstance(event.timestamp, str)):
                raise TypeError("not an event envelope")
            id_key(event.id)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._malformed(position)
            return None
        return event if event.id == position else positioned(event, position)

    def _malformed(self, position: str) -> None:
        self._on_malformed()
        now = time.monotonic()
        if now - self._malformed_logged >= 60:  # once a minute at most
            self._malformed_logged = now
            log.warning("skipping malformed stream entry %s (not an event; further ones "
                        "are counted in hub_stream_entries_malformed_total)", position)

    # -- background loops ---------------------------------------------------------------
    async def _supervise(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``loop`` forever: on a Redis error, mark it dead, back off, reconnect."""
        backoff = Backoff()
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self._alive[name]:
                    backoff.reset()  # it had recovered since the last failure
                self._alive[name] = False
                delay = backoff.next_delay()
                log.warning("redis %s loop lost its connection (%s); retrying in %.2fs",
                            name, exc, delay)
                await asyncio.sleep(delay)
                self._on_reconnect()
            except Exception:
                # A bug, not an outage: log it loudly and keep the instance serving.
                self._alive[name] = False
                log.exception("redis %s loop crashed; restarting", name)
                await asyncio.sleep(backoff.next_delay())
            else:  # pragma: no cover - the loops only return when cancelled
                return

    async def _find_tail(self) -> None:
        """Start reading after the newest entry that exists now: older ones are history."""
        if not self._tail_unknown:
            return
        self._moved_exists = bool(await self.redis.exists(self._key + MOVED_SUFFIX))
        newest = await self.redis.xrevrange(self._key, count=1)
        if newest:
            self.ledger.last_read = id_key(_str(newest[0][0]))
            self.ledger.ids.learn(self.ledger.last_read)
        self._tail_unknown = False

    async def _check_epoch(self) -> None:
        """Notice Redis losing its data (restarted empty, flushed): a key set once per
        dataset changes or vanishes with it."""
        key = self._key + EPOCH_SUFFIX
        epoch = await self.redis.get(key)
        if epoch is None:
            await self.redis.set(key, secrets.token_hex(8), nx=True)
            epoch = await self.redis.get(key)
        value = None if epoch is None else _str(epoch)
        if self._epoch is not None and value != self._epoch:
            log.warning("redis lost its data (restarted empty or flushed): reading the new "
                        "stream from its start, appending recent events again")
            self._generation += 1
            self._deliver_all(self.ledger.redis_reset())
            self._wake_flusher()
        self._epoch = value

    async def _read_stream(self) -> None:
        ledger = self.ledger
        try:
            await self._find_tail()
            await self._check_epoch()
            ledger.reader_back()
            self._alive["stream"] = True
            self._caught_up_at = time.monotonic()
            while True:
                generation = self._generation
                response = await self.redis.xread({self._key: format_id(ledger.last_read)},
                                                  count=READ_COUNT, block=READ_BLOCK_MS)
                if generation != self._generation:
                    continue  # Redis lost its data meanwhile: read the new stream instead
                entries = response[0][1] if response else ()
                if len(entries) < READ_COUNT:
                    self._caught_up_at = time.monotonic()
                # Several events read at once: one write per client for all of them.
                with self._batch() if len(entries) > 1 else nullcontext():
                    for entry in entries:
                        self._read_entry(entry)
        except (RedisError, OSError, TimeoutError):
            # Until it is back, this instance delivers what it publishes itself.
            self._deliver_all(ledger.reader_lost())
            raise

    def _read_entry(self, entry: Any) -> None:
        position, fields = _str(entry[0]), entry[1]
        marker = _field(fields, "m")
        if marker is not None:
            self.ledger.read(position, None, lambda: None)
            if marker == self._instance_id:
                self._marker_read(position, _field(fields, "n"))
            return
        event_id = _field(fields, "i")
        if event_id is None:
            event_id = position
        else:
            self._moved_exists = True
        self._deliver_all(self.ledger.read(position, event_id, lambda: self._decode(entry)))

    def _marker_read(self, position: str, seq: str | None) -> None:
        self._marker_back.append(position)
        out = self._marker_out
        if out is not None and seq is not None and seq.isdigit() and int(seq) >= out[0]:
            self.round_trip_s = time.monotonic() - out[1]
            self._marker_out = None

    async def _health_loop(self) -> None:
        """The round trip: append a small marker, see it come back through the reader (not
        delivered to clients); check the dataset is the same; report the figures."""
        while True:
            self._on_health({"reader_lag_s": self.reader_lag_s,
                             "round_trip_s": self.round_trip_s,
                             "journal_events": float(len(self.journal) if self.journal
                                                     else len(self.ledger.pending))})
            await asyncio.sleep(self._marker_interval)
            if self._marker_back:
                done, self._marker_back = self._marker_back, []
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(self.redis.xdel(self._key, *done), COMMAND_TIMEOUT_S)
            self._marker_seq += 1
            if self._marker_out is None:
                self._marker_out = (self._marker_seq, time.monotonic())
            try:
                await asyncio.wait_for(self.redis.xadd(
                    self._key, {"m": self._instance_id, "n": str(self._marker_seq)},
                    maxlen=self._maxlen, approximate=True), COMMAND_TIMEOUT_S)
                await asyncio.wait_for(self._check_epoch(), COMMAND_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                self._wrote(exc)
                continue
            if not self.ledger.pending:
                self._wrote(None)

    async def _server_time(self) -> Any:
        """Redis' ``TIME`` where the legacy claim script runs."""
        return await self.redis.time()

    async def _subscribe_legacy(self) -> Any:
        seconds, micros = await self._server_time()
        since_ms = int(seconds) * 1000 + int(micros) // 1000
        pubsub = await subscribe(self.redis, self._legacy_channel)
        # A new subscription receives messages from here on: a fresh name and count for
        # the claim script, which aligns it with the channel's shared message count.
        self._legacy_sub = f"{self._instance_id}:{secrets.token_hex(4)}"
        self._legacy_n = 0
        self._legacy_since_ms = since_ms
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
        self._legacy_n += 1
        # Every message takes part in the count, valid or not: every instance counts the
        # same messages, whatever it makes of them.
        parsed = self._legacy_parser(payload)
        digest = hashlib.sha256(payload).hexdigest()[:16]
        body = b""
        if parsed is not None:
            type_, timestamp, data = parsed
            body = Event(id="", type=type_, timestamp=timestamp, data=data).body()
        try:
            result = await self._claim(
                keys=[self._key, self._key + LEGACY_SUFFIX],
                args=[self._maxlen, self._legacy_sub, self._legacy_n, digest, body,
                      self._legacy_since_ms, LEGACY_LOG, LEGACY_ALIGN_MS])
        except aioredis.ResponseError as exc:
            # Redis refuses the claim (OOM): this envelope is lost, the subscription (and
            # its count) stays, so the next ones are claimed in their right place.
            self._wrote(exc)
            self._on_legacy("refused")
            log.error("legacy envelope not ingested: redis refused the claim (%s)", exc)
            return
        if parsed is None:
            self._on_legacy("invalid")
        else:
            self._on_legacy("appended" if _str(result) == "appended" else "duplicate")


def _now_ms() -> int:
    return int(time.time() * 1000)
