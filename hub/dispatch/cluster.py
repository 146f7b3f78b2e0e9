"""The Redis Cluster backend: the event stream sharded over several streams, one per slot.

``REDIS_URL=redis+cluster://HOST:PORT[,HOST:PORT…]`` spreads events over ``shards`` streams
(``HUB_STREAM_KEY`` with a hash tag per shard, e.g. ``{hub:events:0}``, each tag picked so
that the shards fall in different thirds, …, of the slot space and so, on a cluster created
with ``redis-cli --cluster create``, on different masters). An event goes to the shard of
its type (a stable hash of the type name): every key one script touches is in one slot.

Each shard is a :class:`~hub.dispatch.redis.RedisBackend` of its own (its reader, ledger,
journal, health markers): every rule of the single-stream backend holds per shard. What this
module adds is the order between shards, so that ids keep meaning what they mean on one node:

- **One id per event, one total order.** Ids are chosen at the source as before (one
  :class:`~hub.dispatch.ledger.Ids` per instance, shared by its shards, so its ids grow
  across shards). Every instance delivers the events of all shards merged by stream
  position: an event read from one shard is held until every other shard's reader has read
  past its position (a k-way merge with watermarks). A stream's positions only grow, so
  once a reader has read position ``p`` nothing can land behind it: the merged order is the
  same on every instance, and a resume from any id (``history``) returns every later event
  of every shard.
- **Idle shards do not hold the others up.** When an event waits for a shard whose reader
  has nothing to read, this instance appends a watermark marker to that shard at the
  waiting position (only if the stream is not past it already; never delivered, deleted
  like a health marker), which that shard's readers read at once. Cost: a few milliseconds
  and, under load on every shard, nothing (the streams advance by themselves).
- **A shard that is down is left out of the merge** (its reader reconnecting), so a
  failover of one master stalls only its own shard's events; what that shard held and
  this instance had not read yet is delivered when it is back, after later events of other
  shards ("late", as an event appended after an outage is on one node).
- **Acknowledged means replicated** (``wait_replicas``, default 1 for a cluster): an append
  is followed by ``WAIT`` on the same connection; an event a master took but no replica
  confirmed within ``wait_ms`` is treated as an append whose outcome is unknown: it goes to
  the journal and is appended again (by id, so never twice). A master that died before
  replicating therefore loses nothing that was acknowledged. While a master has no replica
  at all (right after its failover), its appends are acknowledged on the master alone.
- **A failover that lost writes** (the new master's stream ends before where a reader had
  read) moves that reader back to the new end: what it read there before is seen already
  (ids), what was appended again after is read.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import hashlib
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)

from hub.config import Settings
from hub.dispatch.base import Backend, History
from hub.dispatch.journal import Journal, default_journal_dir
from hub.dispatch.ledger import Ids, Key, format_id
from hub.dispatch.redis import (
    COMMAND_TIMEOUT_S,
    DEFAULT_WAIT_MS,
    SOCKET_TIMEOUT_S,
    WAIT_BOUNDS,
    RedisBackend,
    _str,
    url_options,
)
from hub.events import Event, id_key

log = logging.getLogger("hub.redis")

SLOTS = 16384
DEFAULT_SHARDS = 3
PROBE_DELAY_S = 0.003  # an event waits this long for idle shards before they are probed
TICK_S = 0.05  # the merge is re-checked at least this often while events wait
MAX_HOLD_S = 1.0  # the longest a shard that reads but does not move holds the others

# A watermark: an entry at the waiting position ARGV[2], unless the stream is past it
# already (XADD refuses an id at or below the last one; nothing is appended then).
WATERMARK = """
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[2], 'm', ARGV[3])
if type(added) == 'table' and added.err then return 0 end
return 1
"""


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[user:password@]host:port[,host:port…][?shards=N&wait_replicas=N
    &wait_ms=N]``: the startup nodes and the options (``shards``, ``wait_replicas``,
    ``wait_ms``, ``username``, ``password``)."""
    parsed = urlsplit(url)
    if parsed.scheme not in {"redis+cluster", "valkey+cluster"}:
        raise ValueError("Invalid Redis Cluster URL: redis+cluster://HOST:PORT[,HOST:PORT…]")
    nodes = []
    for host_port in parsed.netloc.split("@")[-1].split(","):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Invalid Redis Cluster node {host_port!r}: expected HOST:PORT")
        nodes.append((host, int(port)))
    options: dict[str, Any] = {}
    if parsed.username:
        options["username"] = parsed.username
    if parsed.password:
        options["password"] = parsed.password
    numbers, _ = url_options(parsed.query, {"shards": (1, 64), **WAIT_BOUNDS},
                             "Redis Cluster URL")
    return nodes, {**options, **numbers}


class HubRedisCluster(RedisCluster):
    """redis-py's cluster client, whose own errors (no node serves a slot, the cluster
    cannot be reached: ``RedisClusterException``, not a ``RedisError``) are Redis errors
    to hub, as an outage: publishes are journalled, loops reconnect, reads say 503."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterError(str(exc) or type(exc).__name__) from exc


def open_cluster(url: str, max_connections: int = 100) -> RedisCluster:
    nodes, options = parse_cluster_url(url)
    credentials = {k: options[k] for k in ("username", "password") if k in options}
    # The single-node client's bounds (see open_redis): a dead or frozen node fails calls
    # within health's window; redis-py refreshes the slot map on a connection error.
    return HubRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
        max_connections=max_connections, retry=Retry(NoBackoff(), 1),
        health_check_interval=10, **credentials)


def shard_keys(stream_key: str, shards: int) -> list[str]:
    """The stream key of each shard: ``{<stream_key>:<tag>}``, the tag chosen so that shard
    ``i`` lies in the ``i``-th of ``shards`` equal parts of the slot space."""
    keys = []
    for index in range(shards):
        low, high = index * SLOTS // shards, (index + 1) * SLOTS // shards
        for tag in itertools.count(index):
            key = f"{{{stream_key}:{tag}}}"
            if low <= key_slot(key.encode()) < high:
                keys.append(key)
                break
    return keys


def shard_of(type_: str, shards: int) -> int:
    """The shard of an event type: stable across instances and restarts."""
    return binascii.crc32(type_.encode()) % shards


def cluster_journal(settings: Settings, url: str, key: str) -> Journal:
    """A shard's journal: one directory per cluster (its first startup node) and stream."""
    nodes, _ = parse_cluster_url(url)
    where = f"cluster:{nodes[0][0]}:{nodes[0][1]}|{key}"
    base = Path(settings.journal_dir) if settings.journal_dir else default_journal_dir()
    directory = base / hashlib.sha256(where.encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.instance_id)
    return Journal(directory, f"{name}-{os.getpid()}", settings.journal_max_events)


class ShardBackend(RedisBackend):
    """One shard: a stream backend on a cluster client, whose appends wait for a replica
    and whose reader reports each entry it reads to the merge."""

    def __init__(self, client: Any, *, wait_replicas: int, wait_ms: int,
                 on_read: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(client, owns_client=False, wait_replicas=wait_replicas,
                         wait_ms=wait_ms, **kwargs)
        self.reading = False  # inside the reader: events delivered now are in stream order
        self._on_read = on_read
        self._watermark = client.register_script(WATERMARK)

    def _read_entry(self, entry: Any) -> None:
        self.reading = True
        try:
            super()._read_entry(entry)
        finally:
            self.reading = False
        self._on_read()

    async def _find_tail(self) -> None:
        """As on one node; and after a failover that lost writes this reader had read, read
        from where the new master's stream ends (the events lost there are appended again
        by their publishers, whose appends were not confirmed by a replica)."""
        if self._tail_unknown:
            await super()._find_tail()
            return
        try:
            info = await self.redis.xinfo_stream(self._key)
        except ResponseError:
            return  # no stream (yet): the epoch check tells a lost dataset apart
        top = id_key(_str(info.get("last-generated-id", "0-0")))
        if top < self.ledger.last_read:
            log.warning("stream %s ends at %s, before %s where this instance had read: "
                        "writes were lost in a failover; reading from the new end",
                        self._key, format_id(top), format_id(self.ledger.last_read))
            self.ledger.last_read = top

    async def _send(self, commands: list[tuple[Any, ...]]) -> tuple[str, list[Any]]:
        """The append's commands (see RedisBackend._append), on one connection to the
        master of this shard's slot."""
        try:
            node = self.redis.get_node_from_key(self._key)
        except RedisClusterException as exc:  # no node serves the slot now
            self._refresh_slots()
            raise ClusterError(str(exc) or type(exc).__name__) from exc
        sent = [PipelineCommand(n, *command) for n, command in enumerate(commands)]
        await self._pipeline(node, sent)
        return node.name, [command.result for command in sent]

    async def _master_lost(self) -> None:
        self._refresh_slots()

    async def _pipeline(self, node: ClusterNode, commands: list[PipelineCommand]) -> None:
        """Send ``commands`` on one connection to ``node``. A connection found broken (the
        node died: redis-py may hand back one whose transport is closed, which raises
        RuntimeError) is a connection error: the node's connections are dropped, to be
        opened again, and the slot map is read again."""
        try:
            await node.execute_pipeline(commands)
        except RedisError:
            self._refresh_slots()
            raise
        except (OSError, RuntimeError) as exc:
            self._refresh_slots()
            with contextlib.suppress(Exception):
                await node.disconnect()
            raise RedisConnectionError(f"{node.name}: {exc}") from exc

    def _refresh_slots(self) -> None:
        # The next command re-reads the slot map (redis-py does so after a connection
        # error; a pipeline sent to a node directly must ask for it).
        self.redis._initialize = True

    async def _server_time(self) -> Any:
        # The clock of the node that runs the claim script, which compares its own TIME
        # with the one read here: a cluster's nodes are other machines, other clocks.
        return await self.redis.execute_command(
            "TIME", target_nodes=self.redis.get_node_from_key(self._key))

    async def watermark(self, position: Key) -> None:
        """Make this shard's readers read past ``position`` soon (see the module doc)."""
        await asyncio.wait_for(self._watermark(
            keys=[self._key], args=[self._maxlen, format_id(position), self._instance_id]),
            COMMAND_TIMEOUT_S)


class ShardedBackend(Backend):
    """Several :class:`ShardBackend` streams merged into one order (see the module doc)."""

    name = "redis"

    def __init__(self, client: RedisCluster, shards: list[ShardBackend], *,
                 owns_client: bool) -> None:
        self.redis: Any = client
        self.shards = shards
        self._owns_client = owns_client
        ids = Ids()  # one id source for the instance: its ids grow across shards
        for shard in shards:
            shard.ledger.ids = ids
        self._on_event: Callable[[Event], None] | None = None
        self._batch: Callable[[], AbstractContextManager[None]] = nullcontext
        self._heap: list[tuple[Key, int, int, Event]] = []  # read, not released yet
        self._seq = itertools.count()
        self._frontier: Key = (0, 0)  # released up to here: nothing new lands at or below
        self._depth = 0  # inside a shard's batch: release when it ends
        self._probing: set[int] = set()
        self.probes = 0  # watermarks sent (status, bench)
        self._held_since: float | None = None  # the heap's head has waited since
        self._hold_logged = -60.0
        self._skipped: dict[int, Key] = {}  # shard -> where it stood when left out
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._probe_due: asyncio.TimerHandle | None = None
        self._ticker: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, client: RedisCluster, settings: Settings, url: str,
              on_health: Callable[[dict[str, float]], None] = lambda values: None,
              **kwargs: Any) -> ShardedBackend:
        _, options = parse_cluster_url(url)
        keys = shard_keys(settings.stream_key, options.get("shards", DEFAULT_SHARDS))
        figures: list[dict[str, float]] = [{} for _ in keys]
        backend: ShardedBackend

        def health(index: int, values: dict[str, float]) -> None:
            figures[index] = values
            known = [f for f in figures if f]
            on_health({"reader_lag_s": max(f["reader_lag_s"] for f in known),
                       "round_trip_s": max(f["round_trip_s"] for f in known),
                       "journal_events": sum(f["journal_events"] for f in known)})

        def read() -> None:
            backend._read()

        shards = [ShardBackend(
            client, wait_replicas=options.get("wait_replicas", 1),
            wait_ms=options.get("wait_ms", DEFAULT_WAIT_MS),
            on_read=read, stream_key=key,
            history_size=settings.history_size,
            # The legacy channel is ingested once, into the first shard.
            legacy_channel=settings.legacy_channel if index == 0 else "",
            instance_id=settings.instance_id,
            journal=cluster_journal(settings, url, key),
            on_health=functools.partial(health, index),
            **kwargs) for index, key in enumerate(keys)]
        backend = cls(client, shards, owns_client=True)
        return backend

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, on_event: Callable[[Event], None],
                    batch: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self._on_event = on_event
        self._batch = batch
        with contextlib.suppress(RedisError, RedisClusterException, OSError, TimeoutError):
            await self.redis.initialize()  # else the first command does (or fails to)
        for index, shard in enumerate(self.shards):
            await shard.start(functools.partial(self._arrive, index), self._hold)
        self._ticker = asyncio.create_task(self._tick())
        self._release()

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(shard.drain(timeout) for shard in self.shards))

    async def stop(self) -> None:
        if self._probe_due is not None:
            self._probe_due.cancel()
        tasks = [t for t in (self._ticker, *self._probe_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in self.shards:
            await shard.stop()
        if self._owns_client:
            await self.redis.aclose()

    @property
    def connected(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        return [f"shard {shard._key}: {reason}" for shard in self.shards
                for reason in shard.problems()]

    @property
    def subscribed(self) -> bool:
        return all(shard.subscribed for shard in self.shards)

    def status(self) -> dict[str, Any]:
        shards = [shard.status() for shard in self.shards]
        return {"stream": ",".join(s["stream"] for s in shards),
                "last_id": format_id(self._frontier), "shards": shards,
                "held": len(self._heap), "watermarks_sent": self.probes,
                "spooled": sum(s["spooled"] for s in shards),
                "journal": sum(s["journal"] for s in shards),
                "reader_lag_s": max(s["reader_lag_s"] for s in shards),
                "round_trip_s": max(s["round_trip_s"] for s in shards)}

    # -- publishing ---------------------------------------------------------------------
    def shard_for(self, type_: str) -> ShardBackend:
        return self.shards[shard_of(type_, len(self.shards))]

    async def publish(self, type_: str, timestamp: str, data: dict[str, Any]) -> Event:
        return await self.shard_for(type_).publish(type_, timestamp, data)

    # -- the merge ----------------------------------------------------------------------
    def _arrive(self, index: int, event: Event) -> None:
        if self.shards[index].reading:
            heapq.heappush(self._heap, (event.key, index, next(self._seq), event))
        elif self._on_event is not None:
            # Delivered by its shard at once (journalled while that shard is down): as on
            # one node, it reaches this instance's clients now, ahead of its place; what
            # its shard's reader read before goes first (the heap up to the last of them),
            # so that a shard's own order holds.
            heap = self._heap
            mine = [item[0] for item in heap if item[1] == index]
            out = []
            if mine:
                last = max(mine)
                while heap and heap[0][0] <= last:
                    out.append(heapq.heappop(heap)[3])
                self._frontier = max(self._frontier, last)
            with self._batch() if out else nullcontext():
                for held in out:
                    self._on_event(held)
                self._on_event(event)

    def _read(self) -> None:
        if self._depth == 0:
            self._release()

    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        """A shard's batch (entries read together): released together at its end."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    def _watermark(self) -> Key | None:
        """Where every shard that reads has read to (None: no shard reads); a shard left
        out for not moving (``_skipped``) counts again once it has read on."""
        live = []
        for index, shard in enumerate(self.shards):
            if not shard.ledger.reader_up:
                continue
            if index in self._skipped:
                if shard.ledger.last_read == self._skipped[index]:
                    continue
                del self._skipped[index]
            live.append(shard.ledger.last_read)
        return min(live) if live else None

    def _release(self) -> None:
        heap = self._heap
        mark = self._watermark()
        if mark is not None and mark > self._frontier:
            self._frontier = mark
        if heap and heap[0][0] > self._frontier:
            # Held: by a shard that reads but does not move (a frozen master until the
            # socket timeout, a node refusing the watermark's write). Past MAX_HOLD_S
            # the merge goes on without it; what that shard holds then arrives late.
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now
            elif now - self._held_since > MAX_HOLD_S:
                slow = []
                for index, shard in enumerate(self.shards):
                    if shard.ledger.reader_up and shard.ledger.last_read < heap[0][0]:
                        self._skipped[index] = shard.ledger.last_read  # until it moves
                        slow.append(shard._key)
                mark = self._watermark()
                self._frontier = max(self._frontier, heap[0][0], mark or (0, 0))
                if now - self._hold_logged >= 60:
                    self._hold_logged = now
                    log.warning("shard(s) %s did not move for %.1fs: delivering the other "
                                "shards' events without waiting for them", ", ".join(slow),
                                MAX_HOLD_S)
        if not heap or heap[0][0] > self._frontier:
            if not heap:
                self._held_since = None
            elif mark is not None:
                self._probe_soon()
            return
        self._held_since = None
        frontier = self._frontier
        out = []
        while heap and heap[0][0] <= frontier:
            out.append(heapq.heappop(heap)[3])
        if self._on_event is not None:
            with self._batch() if len(out) > 1 else nullcontext():
                for event in out:
                    self._on_event(event)
        if heap:
            self._probe_soon()

    def _probe_soon(self) -> None:
        if self._probe_due is None:
            self._probe_due = asyncio.get_running_loop().call_later(PROBE_DELAY_S,
                                                                    self._probe)

    def _probe(self) -> None:
        self._probe_due = None
        if not self._heap:
            return
        waiting = self._heap[0][0]
        for index, shard in enumerate(self.shards):
            if (shard.ledger.reader_up and shard.ledger.last_read < waiting
                    and index not in self._probing):
                self._probing.add(index)
                self.probes += 1
                task = asyncio.create_task(self._run_probe(index, waiting))
                self._probe_tasks.add(task)
                task.add_done_callback(self._probe_tasks.discard)

    async def _run_probe(self, index: int, position: Key) -> None:
        try:
            await self.shards[index].watermark(position)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("watermark on shard %d failed: %s", index, exc)
        finally:
            self._probing.discard(index)

    async def _tick(self) -> None:
        """Re-check the merge now and then: a shard that stopped reading leaves it, and a
        probe that failed is sent again."""
        while True:
            await asyncio.sleep(TICK_S)
            self._release()

    # -- history ------------------------------------------------------------------------
    async def _position(self, event_id: str) -> str:
        for shard in self.shards:
            if shard._moved_exists:
                position = await shard.position_of(event_id)
                if position != event_id:
                    return position
        return event_id

    async def history(self, after: str, limit: int | None = None) -> History:
        count = None if limit is None else limit + 1
        frontier = self._frontier

        async def read(shard: ShardBackend) -> tuple[list[Any], Any]:
            entries = await shard.redis.xrange(shard._key, min="(" + position, max="+",
                                               count=count)
            try:
                info = await shard.redis.xinfo_stream(shard._key)
            except ResponseError:
                info = None  # no stream yet
            return entries, info

        try:
            position = await self._position(after)
            reads = await asyncio.gather(*(read(shard) for shard in self.shards))
        except (RedisError, OSError) as exc:
            from hub.errors import BackendUnavailable

            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        after_key = id_key(position)
        bound = frontier  # past it, a shard may still get entries: the live path has them
        truncated, first_retained = False, None
        for entries, info in reads:
            if count is not None and len(entries) == count:
                bound = min(bound, id_key(_str(entries[-1][0])))
            if info is None:
                continue
            first = info.get("first-entry")
            added = info.get("entries-added")
            trimmed = added is None or added > info.get("length", 0)
            if first and trimmed and id_key(_str(first[0])) > after_key:
                truncated = True
                first_retained = max(first_retained or "", _str(first[0]), key=_sort_key)
        merged = sorted(((id_key(_str(entry[0])), index, entry)
                         for index, (entries, _info) in enumerate(reads)
                         for entry in entries), key=lambda item: item[:2])
        merged = [item for item in merged if item[0] <= bound]
        more = bound < frontier
        events: list[Event] = []
        last_id = None
        for key, index, entry in merged:
            if limit is not None and len(events) == limit:
                more = True
                break
            last_id = format_id(key)
            event = self.shards[index]._decode(entry)
            if event is not None:
                events.append(event)
        return History(events=events, truncated=truncated, first_retained=first_retained,
                       more=more, last_id=last_id)

    async def latest(self, limit: int, before: str | None = None) -> History:
        frontier = self._frontier
        top = "+" if before is None else "(" + before

        async def read(shard: ShardBackend) -> tuple[list[Any], list[Any]]:
            entries = await shard.redis.xrevrange(shard._key, max=top, min="-",
                                                  count=limit + 1)
            oldest = (await shard.redis.xrange(shard._key, min="-", max="+", count=1)
                      if before is None else [])
            return entries, oldest

        try:
            reads = await asyncio.gather(*(read(shard) for shard in self.shards))
        except (RedisError, OSError) as exc:
            from hub.errors import BackendUnavailable

            raise BackendUnavailable(f"redis unavailable: {exc}") from exc
        merged = sorted(((id_key(_str(entry[0])), index, entry)
                         for index, (entries, _old) in enumerate(reads)
                         for entry in entries), key=lambda item: item[:2], reverse=True)
        merged = [item for item in merged if item[0] <= frontier]
        more = len(merged) > limit
        merged = merged[:limit]
        merged.reverse()
        events = [e for e in (self.shards[i]._decode(entry) for _k, i, entry in merged)
                  if e is not None]
        oldest = [id_key(_str(old[0][0])) for _entries, old in reads if old]
        return History(events=events, truncated=False, more=more,
                       first_retained=format_id(min(oldest)) if oldest else None,
                       last_id=format_id(merged[0][0]) if merged else None,
                       head_id=format_id(merged[-1][0]) if merged else None)


def _sort_key(value: str) -> Key:
    return id_key(value) if value else (0, 0)
