"""The event stream sharded over a Redis Cluster, with real processes.

A local cluster of three masters and three replicas (``redis-server --cluster-enabled yes``,
``redis-cli --cluster create``) on free ports, for the module. Hubs on
``REDIS_URL=redis+cluster://…``: three event types, one per shard (each shard's stream on
another master). Checked: every instance delivers the same events in the same order (the
merge by stream position), a resume from any id on an instance that never saw the events
returns exactly the later ones, paged across shards; the paths that go through the
cluster's pub/sub (the legacy channel, revocations, python-socketio's channel and an
external emitter) across two instances, and again after the node they subscribed on died;
and under a steady load on two ``hub serve`` instances, a master killed with SIGKILL and
failed over to its replica: per client, nothing acknowledged is lost or duplicated, each
type stays in publish order.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis as redis_sync
import socketio
from redis.crc import key_slot

from hub.config import Settings
from hub.dispatch.cluster import ShardedBackend, shard_keys, shard_of
from hub.errors import ConfigError
from hub.events import id_key
from hub.publish import Publisher
from tests import failover
from tests.conftest import (
    SECRET,
    HubProcess,
    RedisClusterNodes,
    make_settings,
    make_token,
    run_hub,
)
from tests.helpers import (
    THREAT,
    close_code,
    connected,
    recv_json,
    recv_type,
    send_json,
    wait_until,
    ws_connect,
)
from tests.sio_helpers import SioClient

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
        order = [m["id"] for m in received[0]]
        # Both instances delivered every event once, in the same order, the order of the
        # ids (the merge by stream position), in which each instance's events keep their
        # publish order (README "Ordering guarantee"). Not publish order across instances:
        # a publish in the same millisecond as the one before, on an instance that has not
        # read that one yet, gets the lower id if its instance's salt is lower
        # (hub.dispatch.ledger.Ids), and is delivered first everywhere.
        assert [m["id"] for m in received[1]] == order
        assert sorted(order) == sorted(ids) and len(set(order)) == len(ids)
        assert sorted(order, key=id_key) == order
        for parity in (0, 1):  # the events of a (even n), then of b (odd n)
            own = [i for n, i in enumerate(ids) if n % 2 == parity]
            assert [i for i in order if i in set(own)] == own, parity
        backend = a.hub.dispatcher.backend
        assert isinstance(backend, ShardedBackend)
        lengths = [await backend.redis.xlen(s._key) for s in backend.shards]
        assert all(n >= 20 for n in lengths), lengths  # every shard took its third

        # A third instance never delivered these (its replay window is empty): a resume
        # reads the shards' histories, merged, in pages of 7 across shards.
        async with run_hub(_settings(cluster, stream)) as c:
            history = c.hub.dispatcher.backend
            for start in (0, 19, 40, 58, 59):
                got, cursor = [], order[start]
                while True:
                    page = await history.history(cursor, limit=7)
                    got += [e.id for e in page.events if e.type in TYPES]
                    if not page.more:
                        break
                    assert page.last_id is not None
                    cursor = page.last_id
                assert got == order[start + 1:], start
                assert not page.truncated
            ws = await connected(c.ws_url, make_token())
            await send_json(ws, {"action": "subscribe", "event_types": TYPES,
                                 "last_event_id": order[29]})
            replayed = []
            while True:
                message = await recv_json(ws)
                if message["type"] == "resumed":
                    break
                if message["type"] in TYPES:
                    replayed.append(message["id"])
            assert replayed == order[30:]
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


def _subscribers(cluster: RedisClusterNodes, channel: str) -> int:
    """How many connections are subscribed to ``channel`` on the whole cluster (PUBSUB
    NUMSUB answers for its own node only)."""
    total = 0
    for port, process in cluster.processes.items():
        if process.poll() is None:
            client = redis_sync.Redis(port=port, socket_timeout=1)
            total += int(client.pubsub_numsub(channel)[0][1])
            client.close()
    return total


def _other_nodes(cluster: RedisClusterNodes, channel: str) -> list[int]:
    """The nodes, masters and replicas, that hold none of ``channel``'s subscriptions: a
    PUBLISH there reaches them only through the cluster bus."""
    others = []
    for port in cluster.roles():
        client = redis_sync.Redis(port=port, socket_timeout=1)
        if not int(client.pubsub_numsub(channel)[0][1]):
            others.append(port)
        client.close()
    assert others, f"every node has subscribers of {channel}"
    return others


async def test_the_legacy_channel_reaches_both_instances_once_each(
        cluster: RedisClusterNodes) -> None:
    """The proxy PUBLISHes envelopes on the legacy channel, on a node the instances did
    not subscribe on, then through a cluster client: both instances receive each one (the
    cluster broadcasts a PUBLISH to every node), the claim script appends each one once
    (identical envelopes are distinct events) and every client gets each once, in the
    order of its publisher's connection."""
    settings = _settings(cluster, f"hub:cluster:{uuid.uuid4().hex[:8]}")
    channel = settings.legacy_channel
    async with run_hub(settings) as a, \
            run_hub(settings.replace(instance_id=settings.instance_id + "-b")) as b:
        clients = [await connected(h.ws_url, make_token()) for h in (a, b)]
        await wait_until(lambda: _subscribers(cluster, channel) >= 2,
                         what="both instances to subscribe to the legacy channel")
        node = redis_sync.Redis(port=_other_nodes(cluster, channel)[0])
        whole = redis_sync.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        sent: list[dict[str, Any]] = []
        ids: list[list[str]] = [[], []]
        publishers: tuple[Any, ...] = (node, whole)
        for phase, publisher in enumerate(publishers):
            envelopes = [{"type": "threat_detected", "timestamp": "2026-02-05T10:30:00+00:00",
                          "data": {**THREAT, "phase": phase}}] * 3  # three identical ones
            envelopes.append({"type": "scan_event", "data": {"phase": phase}})  # not a spec type
            for envelope in envelopes:
                publisher.publish(channel, orjson.dumps(envelope))
                publisher.publish(channel, b"{not json")
            sent += envelopes
            for ws, seen in zip(clients, ids, strict=True):
                got = [await recv_json(ws) for _ in envelopes]
                assert [(m["type"], m["data"]) for m in got] == [
                    (e["type"], e["data"]) for e in envelopes]
                seen += [m["id"] for m in got]
        assert ids[0] == ids[1] and len(set(ids[0])) == len(sent)

        def count(result: str) -> float:
            return float(sum(h.hub.metrics.legacy.labels(result)._value.get()
                             for h in (a, b)))

        await wait_until(lambda: count("appended") + count("duplicate") == 2 * len(sent),
                         what="both instances to claim every envelope")
        assert count("appended") == count("duplicate") == len(sent)
        assert count("invalid") == 2 * len(sent)
        # Once in the stream (the first shard's), and nothing more reaches the clients: the
        # next event of that shard is the next thing they get.
        backend = a.hub.dispatcher.backend
        assert isinstance(backend, ShardedBackend)
        first = backend.shards[0]
        stored = [first._decode(entry) for entry in await first.redis.xrange(first._key)]
        assert [e.id for e in stored if e is not None and e.type != "system_status"] == ids[0]
        after = await a.publish(TYPES[0], {"n": "after"})  # TYPES[0]: the first shard
        for ws in clients:
            assert (await recv_json(ws))["id"] == after.id
            await ws.close()
        node.close()
        whole.close()


async def test_a_revocation_on_one_instance_closes_the_users_connections_on_the_other(
        cluster: RedisClusterNodes) -> None:
    """POST /admin/revocations on a: b closes alice's connections of both transports
    (the notice on the cluster's pub/sub, published after the hash is stored) and refuses
    her token afterwards; an instance started later loads the hash. GET
    /admin/connections on a lists b's connections (b's snapshot in the cluster)."""
    settings = _settings(cluster, f"hub:cluster:{uuid.uuid4().hex[:8]}",
                         connections_registry_s=0.2)
    admin = {"Authorization": f"Bearer {make_token('root', 'admin')}"}
    alice = make_token("alice")
    async with run_hub(settings) as a, \
            run_hub(settings.replace(instance_id=settings.instance_id + "-b")) as b, \
            httpx.AsyncClient(timeout=10) as http:
        ws = await connected(b.ws_url, alice)
        bob = await connected(b.ws_url, make_token("bob"))
        carol = await connected(a.ws_url, make_token("carol"))
        sio = SioClient()
        revoked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sio.client.on("token_revoked", lambda data: revoked.set_result(data))
        await sio.connect(b.url, auth={"token": alice})

        listing: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while True:  # until b's snapshot is in the cluster (stored every 0.2 s)
            response = await http.get(f"{a.url}/admin/connections", headers=admin)
            assert response.status_code == 200, response.text
            listing = response.json()
            where = sorted((c["user_id"], c["transport"], c["instance_id"])
                           for c in listing["connections"])
            if len(where) == 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        a_id, b_id = settings.instance_id, settings.instance_id + "-b"
        assert where == [("alice", "socketio", b_id), ("alice", "websocket", b_id),
                         ("bob", "websocket", b_id), ("carol", "websocket", a_id)], listing
        assert set(listing["instances"]) == {a_id, b_id} and not listing["problems"]

        posted = time.monotonic()
        response = await http.post(f"{a.url}/admin/revocations", headers=admin,
                                   json={"user_id": "alice", "reason": "laptop stolen"})
        assert response.status_code == 201, response.text
        assert await close_code(ws) == (4003, "token revoked")
        assert (await asyncio.wait_for(revoked, 10))["message"] == "token revoked"
        await asyncio.wait_for(sio.disconnected.wait(), 10)
        print(f"\nrevocation on a closed alice's connections on b in "
              f"{time.monotonic() - posted:.3f} s")
        for other in (bob, carol):  # other users, on both instances, are untouched
            await send_json(other, {"action": "ping"})
            assert (await recv_type(other, "pong"))["type"] == "pong"
            await other.close()
        for hub in (a, b):  # refused on both instances afterwards
            assert await close_code(await ws_connect(hub.ws_url, alice)) == (
                4003, "token revoked")
        async with run_hub(settings.replace(instance_id=settings.instance_id + "-c")) as c:
            assert await close_code(await ws_connect(c.ws_url, alice)) == (
                4003, "token revoked")
            assert [r["value"] for r in c.hub.revocations.listing()] == ["alice"]


async def test_an_external_socketio_emitter_on_one_node_reaches_both_instances(
        cluster: RedisClusterNodes) -> None:
    """python-socketio's write-only ``AsyncRedisManager`` takes a ``redis://`` URL of one
    node: given any node, master or replica (here each one the instances' subscriptions
    are not on), its emits reach the Socket.IO clients of both instances."""
    settings = _settings(cluster, f"hub:cluster:{uuid.uuid4().hex[:8]}")
    channel = settings.socketio_channel
    async with run_hub(settings) as a, \
            run_hub(settings.replace(instance_id=settings.instance_id + "-b")) as b:
        clients = [SioClient(), SioClient()]
        for client, hub in zip(clients, (a, b), strict=True):
            await client.connect(hub.url, auth={"token": make_token()})
        await wait_until(lambda: _subscribers(cluster, channel) >= 2,
                         what="both instances to subscribe to the Socket.IO channel")
        ports = _other_nodes(cluster, channel)
        assert {cluster.roles()[p] for p in ports} == {"master", "slave"}
        for n, port in enumerate(ports):
            emitter = socketio.AsyncRedisManager(f"redis://127.0.0.1:{port}/0",
                                                 write_only=True, channel=channel)
            envelope = {"id": f"0-{n}", "type": "threat_detected",
                        "timestamp": "2025-01-15T10:30:00Z", "data": THREAT}
            await emitter.emit("threat_detected", envelope, namespace="/",
                               room="threat_detected")
            await emitter.redis.aclose()
        for client in clients:
            assert [(await client.next_event())["id"] for _ in ports] == [
                f"0-{n}" for n in range(len(ports))]
            await client.close()


def _owners(cluster: RedisClusterNodes) -> Callable[[str], int]:
    """The master port serving a key's (or channel's) slot, as the cluster says now."""
    client = redis_sync.Redis(port=next(iter(cluster.roles())), socket_timeout=1)
    ranges = [(start, end, int(master[1])) for start, end, master, *_ in client.cluster("slots")]
    client.close()
    return lambda name: next(port for start, end, port in ranges
                             if start <= key_slot(name.encode()) <= end)


async def test_the_subscriptions_follow_a_failover_of_their_node(
        cluster: RedisClusterNodes) -> None:
    """The legacy channel, the revocation notices and python-socketio's channel are all
    subscribed on the master of one slot, which is killed (its replica takes over). A
    revocation made at once on a (its hash on another master) is stored and applied, or
    refused and stored nowhere. Each subscription is made again on a node that answers,
    and once the replica is promoted each path works: an external emit reaches both
    Socket.IO clients, an envelope both instances' clients once, and b closes the revoked
    user's connection."""
    owner = _owners(cluster)
    while True:  # the revocations' hash on another master than their notices' channel
        stream = f"hub:cluster:{uuid.uuid4().hex[:8]}"
        victim = owner(stream + ":revocations:notice")
        if owner(stream + ":revocations") != victim:
            break

    def on_victim(prefix: str) -> str:
        return next(name for name in (f"{prefix}-{n}" for n in itertools.count())
                    if owner(name) == victim)

    settings = _settings(cluster, stream, legacy_channel=on_victim("legacy"),
                         socketio_channel=on_victim("socketio"))
    channels = (settings.legacy_channel, settings.socketio_channel,
                stream + ":revocations:notice")
    async with run_hub(settings) as a, \
            run_hub(settings.replace(instance_id=settings.instance_id + "-b")) as b:
        clients = [SioClient(), SioClient()]
        for client, hub in zip(clients, (a, b), strict=True):
            await client.connect(hub.url, auth={"token": make_token()})

        def subscribed() -> bool:
            return all(_subscribers(cluster, channel) >= 2 for channel in channels)

        await wait_until(subscribed, what="both instances to subscribe")
        mallory = await connected(b.ws_url, make_token("mallory"))
        replica = cluster.replica_of(victim)
        cluster.kill(victim)
        # A revocation at once, before the cluster notices (1 s): the hash's master takes
        # it, the notice channel's master is gone. Stored and applied, or (the cluster
        # down already) refused and stored nowhere; never stored but refused.
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{a.url}/admin/revocations", json={"user_id": "mallory"},
                headers={"Authorization": f"Bearer {make_token('root', 'admin')}"})
        assert response.status_code in (201, 503), response.text
        await wait_until(subscribed, timeout=30, what="both instances to subscribe again")
        # Until the replica is promoted the cluster answers CLUSTERDOWN to commands on
        # keys (the claim script's, the revocation's): an envelope then is not ingested.
        await _promoted(cluster, replica)
        live = next(iter(cluster.roles()))  # a node that answers (the victim does not)
        emitter = socketio.AsyncRedisManager(f"redis://127.0.0.1:{live}/0", write_only=True,
                                             channel=settings.socketio_channel)
        await emitter.emit("threat_detected", {"id": "0-1", "type": "threat_detected",
                                               "timestamp": "2025-01-15T10:30:00Z",
                                               "data": THREAT},
                           namespace="/", room="threat_detected")
        for client in clients:
            assert (await client.next_event())["data"] == THREAT
            await client.close()
        await emitter.redis.aclose()
        watchers = [await connected(h.ws_url, make_token()) for h in (a, b)]
        node = redis_sync.Redis(port=live)
        node.publish(settings.legacy_channel, orjson.dumps({"type": "scan_event",
                                                            "data": {"after": "failover"}}))
        node.close()
        for ws in watchers:
            assert (await recv_json(ws))["data"] == {"after": "failover"}
        stored = redis_sync.RedisCluster(host="127.0.0.1", port=live)
        if response.status_code == 201:  # by the notice, or the hash b reloads
            assert await close_code(mallory) == (4003, "token revoked")
        else:
            assert not stored.hexists(stream + ":revocations", "user_id:mallory")
            await mallory.close()
        stored.close()
        marker = await a.publish("threat_detected", THREAT)
        for ws in watchers:  # the envelope was delivered once: the next event is this one
            assert (await recv_json(ws))["id"] == marker.id
            await ws.close()
    # The killed master comes back as a replica of its old replica, for the next tests.
    await asyncio.to_thread(cluster.start_node, victim)
    await _rejoined(cluster, victim)


def _role(port: int) -> str:
    client = redis_sync.Redis(port=port, socket_timeout=1)
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


def _role_or_none(port: int) -> str | None:
    try:
        return _role(port)
    except redis_sync.RedisError:  # not answering yet (loading, or still frozen)
        return None


def _score(received: list[dict[str, Any]], expected: set[str],
           source: dict[str, failover.Sent]) -> dict[str, int]:
    """The tally (out of order: per type, what the sharded stream promises), and ``late``:
    the same across types (events journalled while their shard failed over, delivered
    after later ones)."""
    figure = failover.tally(received, expected, source)
    figure["late"] = failover.out_of_order([m["id"] for m in received], source,
                                           lambda s: s.instance)
    return figure


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_master_failover_under_load(cluster: RedisClusterNodes, tmp_path: Path,
                                          fault: str) -> None:
    """The master holding one type's shard faulted while both instances publish all types
    at a steady rate; the cluster promotes its replica (node timeout 1 s). ``kill``:
    SIGKILL, its sockets are reset; ``freeze``: SIGSTOP, its sockets stay open and silent
    until the replica has taken over and the test is done."""
    unique = uuid.uuid4().hex[:8]
    stream = f"hub:cluster:{unique}"
    env = {**failover.hub_env(cluster.url, stream, unique, tmp_path),
           "HUB_EXTRA_EVENT_TYPES": ",".join(TYPES)}
    with failover.two_hubs(env, "cluster", tmp_path) as hubs:
        await _run(cluster, hubs, stream, fault)


async def _run(cluster: RedisClusterNodes, hubs: list[HubProcess], stream: str,
               fault: str) -> None:
    clients = failover.Clients(hubs, TYPES)
    await clients.connect()

    keys = shard_keys(stream, 3)
    victim = cluster.master_of(keys[1])
    replica = cluster.replica_of(victim)

    def apply_fault() -> None:
        if fault == "kill":
            cluster.kill(victim)
        else:
            cluster.processes[victim].send_signal(signal.SIGSTOP)

    async def promoted(seq: int) -> bool:
        return seq % 6 == 0 and await asyncio.to_thread(_role, replica) == "master"

    load = failover.SteadyLoad(hubs, RATE_HZ, lambda seq: (TYPES[seq % 3], {"seq": seq}))
    await load.run(before_s=BEFORE_S, after_s=AFTER_S, fault=apply_fault, promoted=promoted)

    acked, refused = load.acked(), load.refused()
    acked_ids = {p[3] for p in acked}
    # What the masters hold now: every acknowledged event, once the journals are flushed.
    client = redis_sync.RedisCluster(host="127.0.0.1", port=replica, decode_responses=True)
    deadline = time.monotonic() + 30
    while True:
        in_streams = [i for k in keys for i in failover.stream_ids(client, k)]
        missing = acked_ids - set(in_streams)
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    doubled = len(in_streams) - len(set(in_streams))
    client.close()
    source = load.source()
    await failover.settle(clients, acked_ids, source)
    await failover.wait_healthy(hubs)

    figures = {c.name: _score(c.received, acked_ids, source) for c in clients.all}
    report = (f"cluster {fault}: published {len(load.published)} at {RATE_HZ}/s over 3 "
              f"shards, acknowledged {len(acked)}, refused {len(refused)} "
              f"{sorted({p[2] for p in refused})}, journalled {len(load.journalled)}, "
              f"slowest 202 {max(load.latency):.2f} s; failover {load.failover_s:.1f} s; "
              f"acknowledged but in no stream {len(missing)}, in a stream twice {doubled}; "
              f"per client {figures}")
    print("\nFAILOVER", report)
    failover.assert_delivered(hubs, clients, figures, report)
    assert not refused, (report, [h.log()[-3000:] for h in hubs])
    assert not missing and not doubled, report
    await clients.close()
    # The faulted node comes back as a replica of its old replica: the cluster is whole
    # again for whatever runs next.
    if fault == "kill":
        await asyncio.to_thread(cluster.start_node, victim)
    else:
        cluster.processes[victim].send_signal(signal.SIGCONT)
    await _rejoined(cluster, victim)


async def _promoted(cluster: RedisClusterNodes, replica: int) -> None:
    """Until ``replica`` is the master of its old master's slots and the cluster is ok."""
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(_role_or_none, replica) != "master":
        assert time.monotonic() < deadline, f"{replica} was not promoted"
        await asyncio.sleep(0.1)
    await asyncio.to_thread(cluster.wait_ok)


async def _rejoined(cluster: RedisClusterNodes, victim: int) -> None:
    """Until a failed-over master, started again, is a replica and the cluster whole. It
    first comes back still calling itself the master of its slots (wait_ok takes a master's
    cluster_state:ok as enough) until gossip demotes it: until then master_of() may name
    it for the slots it lost."""
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(_role_or_none, victim) != "slave":
        assert time.monotonic() < deadline, f"{victim} did not rejoin as a replica"
        await asyncio.sleep(0.1)
    await asyncio.to_thread(cluster.wait_ok)
