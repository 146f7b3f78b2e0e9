"""Several instances on one Redis: the stream path, python-socketio's channel, the legacy
channel, outages. Every test uses real redis-server processes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import socketio

from hub import Publisher
from hub.events import Event, now_timestamp
from hub.transports import frames
from tests.conftest import RedisServer, RunningHub, make_settings, make_token, run_hub
from tests.helpers import HEALTH, THREAT, connected, recv_json, send_json, wait_until
from tests.sio_helpers import SioClient


async def test_event_posted_to_one_instance_reaches_both_transports_on_the_other(
        redis_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = redis_hubs
    plain = await connected(b.ws_url, make_token("p"))
    await send_json(plain, {"action": "subscribe", "event_types": ["threat_detected"]})
    await recv_json(plain)
    sio = SioClient()
    await sio.connect(b.url, auth={"token": make_token("s")})
    assert await sio.call("subscribe", {"event_types": ["provider_health_change"]})

    async with httpx.AsyncClient() as http:
        headers = {"Authorization": f"Bearer {make_token('pub', role='admin')}"}
        threat = (await http.post(f"{a.url}/events", headers=headers,
                                  json={"type": "threat_detected", "data": THREAT})).json()
        health = (await http.post(f"{a.url}/events", headers=headers,
                                  json={"type": "provider_health_change", "data": HEALTH})).json()
    got = await recv_json(plain)
    assert got["id"] == threat["id"]
    assert set(got) == {"id", "type", "timestamp", "data"}
    assert got["data"]["attack_type"] == "prompt_injection"
    envelope = await sio.next_event()
    assert envelope["id"] == health["id"]  # the threat was filtered out by its subscription
    assert envelope["data"] == HEALTH
    await plain.close()
    await sio.close()


async def test_ids_are_ordered_across_instances_and_each_client_sees_publish_order(
        redis_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = redis_hubs
    watchers = [await connected(h.ws_url, make_token()) for h in (a, b)]
    published = []
    for i in range(20):
        source = a if i % 2 else b
        published.append(await source.publish("cost_threshold_alert",
                                              {"severity": "info", "message": f"m{i}"}))
    ids = [e.id for e in published]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    for ws in watchers:
        assert [(await recv_json(ws))["id"] for _ in ids] == ids
        await ws.close()


async def test_external_write_only_socketio_emitter_reaches_hub_clients(
        redis_hubs: tuple[RunningHub, RunningHub], redis_server: RedisServer) -> None:
    a, b = redis_hubs
    clients = [SioClient(), SioClient()]
    await clients[0].connect(a.url, auth={"token": make_token()})
    await clients[1].connect(b.url, auth={"token": make_token()})
    channel = a.hub.settings.socketio_channel
    # python-socketio's listeners subscribe in background tasks: a PUBLISH before both
    # have subscribed reaches no one.
    raw = redis_server.client()
    await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 2,
                     what="both instances to subscribe to the Socket.IO channel")
    raw.close()
    emitter = socketio.AsyncRedisManager(redis_server.url, write_only=True, channel=channel)
    envelope = {"id": "0-1", "type": "threat_detected", "timestamp": "2025-01-15T10:30:00Z",
                "data": THREAT}
    await emitter.emit("threat_detected", envelope, namespace="/", room="threat_detected")
    for client in clients:
        assert (await client.next_event())["data"] == THREAT
        await client.close()
    await emitter.redis.aclose()


async def test_legacy_channel_envelopes_reach_each_client_exactly_once(
        redis_hubs: tuple[RunningHub, RunningHub], redis_server: RedisServer) -> None:
    a, b = redis_hubs
    watchers = [await connected(h.ws_url, make_token()) for h in (a, b)]
    channel = a.hub.settings.legacy_channel
    raw = redis_server.client()
    await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 2,
                     what="both instances to subscribe to the legacy channel")
    raw.publish(channel, b"{not json")
    raw.publish(channel, orjson.dumps({"type": "threat_detected", "data": ["not an object"]}))
    for n in range(3):
        raw.publish(channel, orjson.dumps({
            "type": "threat_detected", "timestamp": "2025-01-15T10:30:00Z",
            "data": {**THREAT, "threat_id": f"thr_legacy{n}"}}))
    def count(result: str) -> float:
        return float(sum(h.hub.metrics.legacy.labels(result)._value.get() for h in (a, b)))

    await wait_until(lambda: count("appended") + count("duplicate") == 6,
                     what="both instances to read the three good envelopes")
    assert (count("appended"), count("duplicate"), count("invalid")) == (3, 3, 4)
    marker = await a.publish("system_status", {"status": "config_change"})
    for ws in watchers:
        seen = []
        while True:
            message = await recv_json(ws, skip_status=False)
            if message["id"] == marker.id:
                break
            if message["type"] == "threat_detected":
                seen.append(message["data"]["threat_id"])
        assert seen == ["thr_legacy0", "thr_legacy1", "thr_legacy2"]
        await ws.close()
    raw.close()


async def test_publisher_from_another_process_reaches_every_instance(
        redis_hubs: tuple[RunningHub, RunningHub], redis_server: RedisServer) -> None:
    a, b = redis_hubs
    watchers = [await connected(h.ws_url, make_token()) for h in (a, b)]
    settings = a.hub.settings
    async with Publisher(redis_server.url, stream_key=settings.stream_key) as publisher:
        event = await publisher.publish("cost_threshold_alert", {
            "severity": "critical", "message": "monthly budget exceeded", "threshold": 1000})
    for ws in watchers:
        got = await recv_json(ws)
        assert got["id"] == event.id
        assert got["data"]["threshold"] == 1000
        await ws.close()


async def test_health_follows_the_subscriber_through_a_redis_outage(own_redis: RedisServer
                                                                    ) -> None:
    settings = make_settings(redis_url=own_redis.url)
    async with run_hub(settings) as running, httpx.AsyncClient() as http:
        ws = await connected(running.ws_url, make_token())
        # Measured health (reader lag, a marker's round trip within 2 s) can read degraded
        # for a moment after a stall on a loaded machine: poll it, as after the outage.
        deadline = asyncio.get_running_loop().time() + 20
        while (health := (await http.get(f"{running.url}/ws/health")).json()
               )["status"] != "healthy":
            assert asyncio.get_running_loop().time() < deadline, health
            await asyncio.sleep(0.05)
        assert health["redis_connected"] is True
        assert health["backend"] == "redis"

        own_redis.stop()
        await wait_until(lambda: not running.hub.dispatcher.backend.connected,
                         what="the backend to notice the outage")
        response = await http.get(f"{running.url}/ws/health")
        assert response.status_code == 200
        assert response.json()["status"] == "degraded"
        assert response.json()["redis_connected"] is False
        # The connection survives the outage.
        await send_json(ws, {"action": "ping"})
        assert (await recv_json(ws))["type"] == "pong"

        own_redis.start()
        await wait_until(lambda: running.hub.dispatcher.backend.connected, timeout=20,
                         what="the backend to reconnect")
        # Health is computed when asked (a marker must come back within the window), so
        # a slow machine may see it turn healthy a moment after the backend did: poll it.
        deadline = asyncio.get_running_loop().time() + 20
        while (status := (await http.get(f"{running.url}/ws/health")).json()["status"]
               ) != "healthy":
            assert asyncio.get_running_loop().time() < deadline, status
            await asyncio.sleep(0.05)
        event = await running.publish("threat_detected", THREAT)
        assert (await recv_json(ws))["id"] == event.id
        assert running.hub.metrics.redis_reconnects._value.get() >= 1
        await ws.close()

        # python-socketio's channel is back too: an external emitter reaches Socket.IO
        # clients again (once its listener, on a backoff of its own, has resubscribed;
        # a PUBLISH before that reaches no one, so emit until one arrives).
        sio = SioClient()
        await sio.connect(running.url, auth={"token": make_token()})
        emitter = socketio.AsyncRedisManager(own_redis.url, write_only=True,
                                             channel=settings.socketio_channel)
        envelope = {"id": "0-1", "type": "threat_detected",
                    "timestamp": "2025-01-15T10:30:00Z", "data": THREAT}
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            await emitter.emit("threat_detected", envelope, namespace="/",
                               room="threat_detected")
            try:
                assert (await sio.next_event(timeout=0.5))["data"] == THREAT
                break
            except TimeoutError:
                assert asyncio.get_running_loop().time() < deadline, "emits never arrived"
        await sio.close()
        await emitter.redis.aclose()


async def test_host_owned_client_with_decoded_responses(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    settings = make_settings()
    async with run_hub(settings, redis=client) as running:
        sio = SioClient()
        await sio.connect(running.url, auth={"token": make_token()})
        ws = await connected(running.ws_url, make_token())
        event = await running.publish("threat_detected", THREAT)
        assert (await recv_json(ws))["id"] == event.id
        assert (await sio.next_event())["id"] == event.id
        await ws.close()
        await sio.close()
    assert await client.ping()  # the host's client is not closed by the hub
    await client.aclose()


async def test_instances_keep_serving_local_clients_when_started_in_any_order(
        redis_server: RedisServer) -> None:
    """A plain-only instance must hear other instances from start-up on."""
    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as a, run_hub(settings.replace(instance_id="b")) as b:
        ws = await connected(b.ws_url, make_token())
        event = await a.publish("threat_detected", THREAT)
        assert (await asyncio.wait_for(recv_json(ws), 10))["id"] == event.id
        await ws.close()


async def test_redis_outage_loses_nothing_and_duplicates_nothing(own_redis: RedisServer) -> None:
    """Two instances, a plain and a Socket.IO client on each, publishers on each; Redis is
    killed mid-stream and started again (empty, as without persistence)."""
    settings = make_settings(redis_url=own_redis.url)
    async with run_hub(settings) as a, run_hub(settings.replace(instance_id="b")) as b:
        hubs = (a, b)
        plain = [await connected(h.ws_url, make_token()) for h in hubs]
        sio = [SioClient() for _ in hubs]
        for client, h in zip(sio, hubs, strict=True):
            await client.connect(h.url, auth={"token": make_token()})
        received: list[list[tuple[str, int]]] = [[] for _ in range(4)]
        total = 2 * 3 * 40

        async def read_plain(ws: Any, out: list[tuple[str, int]]) -> None:
            while len(out) < total:
                message = await recv_json(ws, timeout=60)
                if message["type"] == "cost_threshold_alert":
                    out.append((message["data"]["src"], message["data"]["n"]))

        async def read_sio(client: SioClient, out: list[tuple[str, int]]) -> None:
            while len(out) < total:
                envelope = await client.next_event("cost_threshold_alert", timeout=60)
                out.append((envelope["data"]["src"], envelope["data"]["n"]))

        readers = [asyncio.create_task(read_plain(ws, out))
                   for ws, out in zip(plain, received[:2], strict=True)]
        readers += [asyncio.create_task(read_sio(c, out))
                    for c, out in zip(sio, received[2:], strict=True)]

        async def burst(start: int) -> None:
            for n in range(start, start + 40):
                for h in hubs:
                    await h.publish("cost_threshold_alert", {
                        "severity": "info", "message": "tick", "src": h.hub.settings.instance_id,
                        "n": n})
                await asyncio.sleep(0.005)  # a steady publisher, not synchronisation

        await burst(0)
        own_redis.stop()
        await wait_until(lambda: not any(h.hub.dispatcher.backend.connected for h in hubs),
                         what="both instances to notice the outage")
        await burst(40)  # published while Redis is down
        # Local clients were served during the outage.
        await wait_until(lambda: all(len(r) >= 80 for r in received), timeout=20,
                         what="local delivery during the outage")
        own_redis.start()
        await wait_until(lambda: all(h.hub.dispatcher.backend.connected for h in hubs),
                         timeout=30, what="both instances to reconnect")
        await burst(80)
        await asyncio.wait_for(asyncio.gather(*readers), 60)

        for got in received:
            assert len(got) == total == len(set(got))  # every event once
            for src in ("b", settings.instance_id):
                assert [n for s, n in got if s == src] == list(range(120))  # in order
        for ws in plain:
            await ws.close()
        for client in sio:
            await client.close()


async def test_events_a_trailing_reader_has_not_read_back_are_neither_overtaken_nor_lost(
        own_redis: RedisServer) -> None:
    """An instance's stream reader trails its own publishes (by a round trip, by seconds
    while it reconnects). If Redis dies in between, those events must still reach the
    instance's clients ahead of what is published during the outage, and once Redis is back
    (empty) they must be in the stream again without any instance getting one twice."""
    settings = make_settings(redis_url=own_redis.url)
    async with run_hub(settings) as a, run_hub(settings.replace(instance_id="b")) as b:
        ws_a = await connected(a.ws_url, make_token())
        ws_b = await connected(b.ws_url, make_token())

        async def tick(hub: RunningHub, n: int) -> None:
            await hub.publish("cost_threshold_alert", {"severity": "info", "message": "t",
                                                       "n": n})

        async def ticks(ws: Any, count: int) -> list[int]:
            return [(await recv_json(ws))["data"]["n"] for _ in range(count)]

        # Hold a's reader where it is: what a publishes now is in Redis, unread by a.
        backend = a.hub.dispatcher.backend
        backend.loops["stream"].cancel()
        for n in range(3):
            await tick(a, n)
        assert await ticks(ws_b, 3) == [0, 1, 2]

        own_redis.stop()
        await tick(a, 3)  # Redis is gone: a delivers it itself, after the three before it
        assert await ticks(ws_a, 4) == [0, 1, 2, 3]

        own_redis.start()  # empty, as without persistence
        await wait_until(lambda: backend.status()["spooled"] == 0, timeout=20,
                         what="a's spool to be appended")
        await wait_until(lambda: b.hub.dispatcher.backend.connected, timeout=20,
                         what="b to reconnect")
        await tick(b, 99)  # after 3 in the stream, and b's reader delivers both in order
        assert await ticks(ws_b, 2) == [3, 99]  # 0-2 not again, 3 once
        entries: Any = own_redis.client().xrange(settings.stream_key)
        # Health markers (no "e") aside; the instances' recent events (their "online"
        # announcements) are appended again after the restart too, each once.
        ticks_in_stream = [body["data"]["n"] for body in
                           (orjson.loads(f[b"e"]) for _, f in entries if b"e" in f)
                           if body["type"] == "cost_threshold_alert"]
        assert ticks_in_stream == [0, 1, 2, 3, 99]
        await ws_a.close()
        await ws_b.close()


async def test_events_read_together_reach_each_client_whole_and_in_order(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events one XREAD returns together go to each client in joined writes (flushed in
    pieces past a limit, here a small one): none lost or reordered, on both transports."""
    monkeypatch.setattr(frames._Batch, "LIMIT", 7)
    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as running:
        ws = await connected(running.ws_url, make_token())
        sio = SioClient()
        await sio.connect(running.url, auth={"token": make_token()})
        client = aioredis.Redis.from_url(redis_server.url)
        pipe = client.pipeline(transaction=True)  # appended at once: read in one XREAD
        for n in range(200):
            event = Event(id="", type="cost_threshold_alert", timestamp=now_timestamp(),
                          data={"severity": "info", "message": "t", "n": n})
            pipe.xadd(settings.stream_key, {"e": event.body()})
        await pipe.execute()
        assert [(await recv_json(ws))["data"]["n"] for _ in range(200)] == list(range(200))
        assert [(await sio.next_event())["data"]["n"] for _ in range(200)] == list(range(200))
        await client.aclose()
        await ws.close()
        await sio.close()
