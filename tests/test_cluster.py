"""The event stream sharded over a Redis Cluster, with real processes.

A local cluster of three masters and three replicas (``redis-server --cluster-enabled yes``,
``redis-cli --cluster create``) on free ports, for the module. Hubs on
``REDIS_URL=redis+cluster://…``: three event types, one per shard (each shard's stream on
another master). Checked: every instance delivers the same events in the same order (the
merge by stream position), a resume from any id on an instance that never saw the events
returns exactly the later ones, paged across shards; and under a steady load on two
``hub serve`` instances, a master killed with SIGKILL and failed over to its replica: per
client, nothing acknowledged is lost or duplicated, each type stays in publish order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
import socketio
from redis.crc import key_slot

from hub.config import Settings
from hub.dispatch.cluster import ShardedBackend, shard_keys, shard_of
from hub.errors import ConfigError
from hub.publish import Publisher
from tests.conftest import (
    SECRET,
    HubProcess,
    RedisClusterNodes,
    make_settings,
    make_token,
    run_hub,
    start_hub_process,
    stop_process,
)
from tests.helpers import connected, recv_json, send_json, wait_until

pytestmark = pytest.mark.slow

# One type per shard (shard_of: crc32 of the name, modulo 3).
TYPES = ["load_c", "load_b", "load_a"]
RATE_HZ = 60          # events per second, both instances together
BEFORE_S = 1.5        # publishing before the kill
AFTER_S = 2.0         # publishing after the replica took over


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(masters=3, replicas=1, node_timeout_ms=1000)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def test_the_types_fall_on_three_masters(cluster: RedisClusterNodes) -> None:
    """The premise of the tests below: one type per shard, each shard on its own master."""
    assert [shard_of(t, 3) for t in TYPES] == [0, 1, 2]
    keys = shard_keys("hub:events", 3)
    assert len({cluster.master_of(k) for k in keys}) == 3


@pytest.mark.parametrize("url", [
    "redis+cluster://",                                  # no node
    "redis+cluster://127.0.0.1",                         # no port
    "redis+cluster://127.0.0.1:7000,:7001",              # no host
    "redis+cluster://127.0.0.1:7000?shards=0",           # out of bounds
    "redis+cluster://127.0.0.1:7000?shards=1000",
    "redis+cluster://127.0.0.1:7000?wait_ms=abc",        # not a number
    "redis+cluster://127.0.0.1:7000?readonly=1",         # unknown option
])
def test_a_bad_cluster_url_is_refused_at_start_up_with_the_reason(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"JWT_SECRET": SECRET, "REDIS_URL": url})
    assert "REDIS_URL" in caught.value.message


def test_shard_keys_take_one_slot_range_each() -> None:
    for shards in (1, 2, 3, 5, 16):
        keys = shard_keys("hub:events", shards)
        slots = [key_slot(k.encode()) for k in keys]
        assert [s * shards // 16384 for s in slots] == list(range(shards)), keys
        # Every key a script touches (the stream and its suffixed keys) is in one slot.
        assert all(key_slot(f"{k}:moved".encode()) == key_slot(k.encode()) for k in keys)


def _settings(cluster: RedisClusterNodes, stream: str, **overrides: Any) -> Any:
    return make_settings(redis_url=cluster.url, stream_key=stream,
                         extra_event_types=tuple(TYPES), **overrides)


async def test_one_order_on_every_instance_and_resume_from_any_id(
        cluster: RedisClusterNodes) -> None:
    stream = f"hub:cluster:{uuid.uuid4().hex[:8]}"
    async with run_hub(_settings(cluster, stream)) as a, \
            run_hub(_settings(cluster, stream)) as b:
        clients = [await connected(h.ws_url, make_token()) for h in (a, b)]
        for ws in clients:
            await send_json(ws, {"action": "subscribe", "event_types": TYPES})
            while (await recv_json(ws))["type"] != "subscription_updated":
                pass
        published = []
        for n in range(60):  # the types in turn, from both instances in turn
            hub = (a, b)[n % 2]
            published.append(await hub.publish(TYPES[n % 3], {"n": n}))
        received: list[list[dict[str, Any]]] = [[], []]
        for ws, got in zip(clients, received, strict=True):
            while len(got) < len(published):
                message = await recv_json(ws)
                if message["type"] in TYPES:
                    got.append(message)
            await ws.close()
        ids = [e.id for e in published]
        # Both instances delivered every event once, in the same order: the publish order
        # (each publish waited for the one before), which is the order of the ids.
        assert [m["id"] for m in received[0]] == ids
        assert [m["id"] for m in received[1]] == ids
        assert sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) == ids
        backend = a.hub.dispatcher.backend
        assert isinstance(backend, ShardedBackend)
        lengths = [await backend.redis.xlen(s._key) for s in backend.shards]
        assert all(n >= 20 for n in lengths), lengths  # every shard took its third

        # A third instance never delivered these (its replay window is empty): a resume
        # reads the shards' histories, merged, in pages of 7 across shards.
        async with run_hub(_settings(cluster, stream)) as c:
            history = c.hub.dispatcher.backend
            for start in (0, 19, 40, 58, 59):
                got, cursor = [], ids[start]
                while True:
                    page = await history.history(cursor, limit=7)
                    got += [e.id for e in page.events if e.type in TYPES]
                    if not page.more:
                        break
                    assert page.last_id is not None
                    cursor = page.last_id
                assert got == ids[start + 1:], start
                assert not page.truncated
            ws = await connected(c.ws_url, make_token())
            await send_json(ws, {"action": "subscribe", "event_types": TYPES,
                                 "last_event_id": ids[29]})
            replayed = []
            while True:
                message = await recv_json(ws)
                if message["type"] == "resumed":
                    break
                if message["type"] in TYPES:
                    replayed.append(message["id"])
            assert replayed == ids[30:]
            # Live events after the replay, on the third instance too, once each.
            late = await a.publish(TYPES[2], {"n": 60})
            while (message := await recv_json(ws))["type"] not in TYPES:
                pass
            assert message["id"] == late.id
            # An external publisher on the cluster URL appends to the type's shard.
            async with Publisher(cluster.url, stream_key=stream,
                                 extra_event_types=TYPES) as publisher:
                external = await publisher.publish(TYPES[1], {"n": 61})
            while (message := await recv_json(ws))["type"] not in TYPES:
                pass
            assert message["id"] == external.id
            await ws.close()


class Plain:
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.closed: int | None = None
        self.ready = asyncio.Event()

    async def run(self, url: str) -> None:
        ws = await connected(url, make_token(self.name))
        await send_json(ws, {"action": "subscribe", "event_types": TYPES})
        while (await recv_json(ws))["type"] != "subscription_updated":
            pass
        self.ready.set()
        try:
            while True:
                message = await recv_json(ws, timeout=3600)
                if message["type"] in TYPES:
                    self.received.append(message)
        except asyncio.CancelledError:
            await ws.close()
            raise
        except Exception:
            self.closed = ws.close_code
            raise


class Sio:
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.client = socketio.AsyncClient(reconnection=False)
        self.disconnects = 0
        for type_ in TYPES:
            self.client.on(type_, self._event)
        self.client.on("disconnect", self._disconnect)

    async def _event(self, envelope: dict[str, Any]) -> None:
        self.received.append(envelope)

    async def _disconnect(self, reason: Any = None) -> None:
        self.disconnects += 1

    async def connect(self, url: str) -> None:
        await self.client.connect(url, auth={"token": make_token(self.name),
                                             "event_types": TYPES},
                                  transports=["websocket"], wait_timeout=10)


def _role(port: int) -> str:
    client = redis_sync.Redis(port=port, socket_timeout=1)
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


def stream_ids(client: Any, stream: str) -> list[str]:
    entries: list[tuple[str, dict[str, str]]] = client.xrange(stream)
    return [fields.get("i", entry) for entry, fields in entries if "e" in fields]


def score(received: list[dict[str, Any]], expected: set[str],
          source: dict[str, tuple[str, str, float, float]]) -> dict[str, int]:
    """Lost / duplicated / foreign against ``expected``; out of order: per type (what the
    sharded stream promises), an event arriving after one from the same instance whose
    request was sent only after its own 202 came back; ``late``: the same across types
    (events journalled while their shard failed over, delivered after later ones)."""
    ids = [m["id"] for m in received]
    per_type: dict[tuple[str, str], float] = {}
    per_instance: dict[str, float] = {}
    out_of_order = late = 0
    for event_id in ids:
        if event_id not in source:
            continue
        instance, type_, sent, acked = source[event_id]
        out_of_order += acked < per_type.get((instance, type_), -1.0)
        late += acked < per_instance.get(instance, -1.0)
        per_type[instance, type_] = max(sent, per_type.get((instance, type_), -1.0))
        per_instance[instance] = max(sent, per_instance.get(instance, -1.0))
    return {"received": len(ids), "lost": len(expected - set(ids)),
            "duplicated": len(ids) - len(set(ids)), "out_of_order": out_of_order,
            "late": late, "foreign": len(set(ids) - expected)}


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_master_failover_under_load(cluster: RedisClusterNodes, tmp_path: Path,
                                          fault: str) -> None:
    """The master holding one type's shard faulted while both instances publish all types
    at a steady rate; the cluster promotes its replica (node timeout 1 s). ``kill``:
    SIGKILL, its sockets are reset; ``freeze``: SIGSTOP, its sockets stay open and silent
    until the replica has taken over and the test is done."""
    unique = uuid.uuid4().hex[:8]
    stream = f"hub:cluster:{unique}"
    env = {"REDIS_URL": cluster.url, "JWT_SECRET": SECRET, "HUB_STREAM_KEY": stream,
           "HUB_SOCKETIO_CHANNEL": f"socketio-{unique}", "HUB_JSON_LOGS": "0",
           "HUB_JOURNAL_DIR": str(tmp_path / "journal"),
           "HUB_EXTRA_EVENT_TYPES": ",".join(TYPES)}
    hubs: list[HubProcess] = []
    try:
        for name in ("a", "b"):
            hubs.append(start_hub_process({**env, "HUB_INSTANCE_ID": f"cluster-{name}"},
                                          tmp_path=tmp_path))
        await _run(cluster, hubs, stream, fault)
    finally:
        for hub in hubs:
            stop_process(hub.process)


async def _run(cluster: RedisClusterNodes, hubs: list[HubProcess], stream: str,
               fault: str) -> None:
    plains = [Plain(f"plain-{n}") for n in range(len(hubs))]
    tasks = [asyncio.create_task(p.run(h.url.replace("http", "ws") + "/ws/events"))
             for p, h in zip(plains, hubs, strict=True)]
    for plain in plains:
        await asyncio.wait_for(plain.ready.wait(), 10)
    sios = [Sio(f"sio-{n}") for n in range(len(hubs))]
    for sio, hub in zip(sios, hubs, strict=True):
        await sio.connect(hub.url)

    keys = shard_keys(stream, 3)
    victim = cluster.master_of(keys[1])
    replica = cluster.replica_of(victim)
    admin = {"Authorization": f"Bearer {make_token('ops', 'admin')}"}
    published: list[tuple[int, str, int, str]] = []  # (seq, instance, status, id)
    timing: dict[int, tuple[float, float]] = {}
    journalled: list[int] = []
    latency: list[float] = []
    killed_at = promoted_at = None
    async with httpx.AsyncClient(timeout=10) as http:
        async def post(seq: int) -> None:
            hub = hubs[seq % len(hubs)]
            began = time.monotonic()
            try:
                response = await http.post(f"{hub.url}/events", headers=admin,
                                           json={"type": TYPES[seq % 3], "data": {"seq": seq}})
                latency.append(time.monotonic() - began)
                timing[seq] = (began, time.monotonic())
                body = response.json() if response.status_code == 202 else {}
                if body.get("durable") is False:
                    journalled.append(seq)
                published.append((seq, hub.url, response.status_code, body.get("id", "")))
            except httpx.HTTPError as exc:
                published.append((seq, hub.url, -1, type(exc).__name__))

        posts: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for seq in itertools.count():
            await asyncio.sleep(max(0.0, start + seq / RATE_HZ - time.monotonic()))
            posts.append(asyncio.create_task(post(seq)))
            now = time.monotonic()
            if killed_at is None and now - start >= BEFORE_S:
                if fault == "kill":
                    cluster.kill(victim)
                else:
                    cluster.processes[victim].send_signal(signal.SIGSTOP)
                killed_at = now
            if (killed_at is not None and promoted_at is None and seq % 6 == 0
                    and await asyncio.to_thread(_role, replica) == "master"):
                promoted_at = now
            if promoted_at is not None and now - promoted_at >= AFTER_S:
                break
            assert killed_at is None or now - killed_at < 30, "no failover within 30 s"
        await asyncio.gather(*posts)
    assert killed_at is not None and promoted_at is not None

    acked = [p for p in sorted(published) if p[2] == 202]
    refused = [p for p in published if p[2] != 202]
    acked_ids = {p[3] for p in acked}
    # What the masters hold now: every acknowledged event, once the journals are flushed.
    client = redis_sync.RedisCluster(host="127.0.0.1", port=replica, decode_responses=True)
    deadline = time.monotonic() + 30
    while True:
        in_streams = [i for k in keys for i in stream_ids(client, k)]
        missing = acked_ids - set(in_streams)
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    doubled = len(in_streams) - len(set(in_streams))
    client.close()
    source = {p[3]: (p[1], TYPES[p[0] % 3], *timing[p[0]]) for p in acked}
    clients: list[Any] = [*plains, *sios]
    with contextlib.suppress(AssertionError):  # reported below
        await wait_until(lambda: not any(score(c.received, acked_ids, source)["lost"]
                                         for c in clients), 30, "every client has every event")
    health: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        deadline = time.monotonic() + 30
        while True:
            health = {h.url: (await http.get(f"{h.url}/ws/health")).json() for h in hubs}
            if all(v["status"] == "healthy" for v in health.values()):
                break
            assert time.monotonic() < deadline, f"not healthy after the failover: {health}"
            await asyncio.sleep(0.2)

    figures = {c.name: score(c.received, acked_ids, source) for c in clients}
    report = (f"cluster {fault}: published {len(published)} at {RATE_HZ}/s over 3 shards, "
              f"acknowledged {len(acked)}, refused {len(refused)} "
              f"{sorted({p[2] for p in refused})}, journalled {len(journalled)}, slowest 202 "
              f"{max(latency):.2f} s; failover {promoted_at - killed_at:.1f} s; acknowledged "
              f"but in no stream {len(missing)}, in a stream twice {doubled}; per client "
              f"{figures}")
    print("\nFAILOVER", report)
    for hub in hubs:
        assert hub.process.poll() is None, hub.log()
    assert all(c.closed is None for c in plains) and all(s.disconnects == 0 for s in sios), \
        report
    assert not refused, (report, [h.log()[-3000:] for h in hubs])
    assert not missing and not doubled, report
    for name, figure in figures.items():
        assert figure["lost"] == 0 and figure["duplicated"] == 0, (name, report)
        assert figure["out_of_order"] == 0 and figure["foreign"] == 0, (name, report)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sio in sios:
        await sio.client.disconnect()
    # The faulted node comes back as a replica of its old replica: the cluster is whole
    # again for whatever runs next.
    if fault == "kill":
        await asyncio.to_thread(cluster.start_node, victim)
    else:
        cluster.processes[victim].send_signal(signal.SIGCONT)
    await asyncio.to_thread(cluster.wait_ok)
