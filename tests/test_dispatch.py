"""Resume and replay: retained history after an id, on both backends and both transports."""

from __future__ import annotations

import asyncio

from tests.conftest import RedisServer, RunningHub, make_settings, make_token, run_hub
from tests.helpers import HEALTH, THREAT, connected, recv_json, recv_type, send_json
from tests.sio_helpers import SioClient


async def test_resume_replays_matching_events_then_goes_live(any_hub: RunningHub) -> None:
    first = await any_hub.publish("threat_detected", {**THREAT, "n": 0})
    missed = [await any_hub.publish("threat_detected", {**THREAT, "n": i}) for i in (1, 2)]
    await any_hub.publish("provider_health_change", HEALTH)  # not subscribed: not replayed
    await any_hub.publish("threat_detected", {**THREAT, "n": 3, "tenant_id": "other"})
    missed.append(await any_hub.publish("threat_detected", {**THREAT, "n": 4}))

    ws = await connected(any_hub.ws_url, make_token())
    await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"],
                         "last_event_id": first.id})
    assert (await recv_json(ws))["type"] == "subscription_updated"
    replayed = [await recv_json(ws) for _ in missed]
    assert [e["id"] for e in replayed] == [e.id for e in missed]
    resumed = await recv_json(ws)
    assert resumed["type"] == "resumed"
    assert resumed["data"]["replayed"] == 3
    assert resumed["data"]["truncated"] is False
    live = await any_hub.publish("threat_detected", {**THREAT, "n": 5})
    assert (await recv_json(ws))["id"] == live.id
    await ws.close()


async def test_resume_has_no_gap_and_no_duplicate_under_concurrent_publishing(
        any_hub: RunningHub) -> None:
    start = await any_hub.publish("cost_threshold_alert", {"severity": "info", "message": "0"})
    ws = await connected(any_hub.ws_url, make_token())
    await send_json(ws, {"action": "subscribe", "event_types": ["cost_threshold_alert"]})
    await recv_json(ws)

    async def publish_many() -> list[str]:
        ids = []
        for i in range(1, 201):
            event = await any_hub.publish("cost_threshold_alert",
                                          {"severity": "info", "message": str(i)})
            ids.append(event.id)
            if i % 20 == 0:
                await asyncio.sleep(0)  # let the resume interleave with publishing
        return ids

    publisher = asyncio.create_task(publish_many())
    await send_json(ws, {"action": "subscribe", "event_types": ["cost_threshold_alert"],
                         "last_event_id": start.id})
    ids = await publisher
    seen: list[str] = []
    while len(seen) < len(ids):
        message = await recv_json(ws)
        if message["type"] == "cost_threshold_alert":
            seen.append(message["id"])
    assert seen == ids  # every event after `start` exactly once, in order
    await ws.close()


async def test_last_event_id_header_resumes_at_connect(memory_hub: RunningHub) -> None:
    first = await memory_hub.publish("threat_detected", THREAT)
    second = await memory_hub.publish("threat_detected", THREAT)
    ws = await connected(memory_hub.ws_url, make_token(),
                         additional_headers={"Last-Event-ID": first.id})
    assert (await recv_json(ws))["id"] == second.id
    assert (await recv_json(ws))["type"] == "resumed"
    await ws.close()


async def test_resume_past_retention_says_what_was_lost(redis_server: RedisServer) -> None:
    for settings in (make_settings(history_size=5),
                     make_settings(history_size=5, redis_url=redis_server.url)):
        async with run_hub(settings) as running:
            first = await running.publish("threat_detected", THREAT)
            published = [await running.publish("threat_detected", THREAT) for _ in range(300)]
            assert await running.hub.dispatcher.wait_delivered(published[-1], 10)
            if settings.redis_url:
                # Redis trims approximately (MAXLEN ~ drops whole nodes); trim exactly here,
                # by id: the stream also holds the instances' health markers, so the last
                # five entries need not be five events on a slow machine.
                raw = redis_server.client()
                raw.xtrim(settings.stream_key, minid=published[-5].id, approximate=False)
                raw.close()
            ws = await connected(running.ws_url, make_token())
            await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"],
                                 "last_event_id": first.id})
            await recv_type(ws, "subscription_updated")
            notice = await recv_json(ws)
            assert notice["type"] == "history_truncated", (settings.backend, notice)
            assert notice["data"]["last_event_id"] == first.id
            retained = notice["data"]["first_retained_id"]
            assert retained != first.id
            assert (await recv_json(ws))["id"] == retained
            resumed = await recv_type(ws, "resumed")
            assert resumed["data"]["truncated"] is True
            assert resumed["data"]["replayed"] == 5
            await ws.close()


async def test_socketio_resumes_from_auth_last_event_id(any_hub: RunningHub) -> None:
    first = await any_hub.publish("threat_detected", THREAT)
    missed = await any_hub.publish("threat_detected", THREAT)
    client = SioClient()
    await client.connect(any_hub.url, auth={"token": make_token(), "last_event_id": first.id,
                                            "event_types": ["threat_detected"]})
    assert (await client.next_event())["id"] == missed.id
    assert (await client.next_other("resumed"))["replayed"] == 1
    live = await any_hub.publish("threat_detected", THREAT)
    assert (await client.next_event())["id"] == live.id
    await client.close()


async def test_socketio_subscribe_with_last_event_id_acks_the_replay(memory_hub: RunningHub
                                                                     ) -> None:
    first = await memory_hub.publish("provider_health_change", HEALTH)
    missed = await memory_hub.publish("provider_health_change", HEALTH)
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token()})
    ack = await client.call("subscribe", {"event_types": ["provider_health_change"],
                                          "last_event_id": first.id})
    assert ack["subscribed_to"] == ["provider_health_change"]
    assert ack["replayed"] == 1
    assert (await client.next_event())["id"] == missed.id
    await client.close()


async def test_a_replay_larger_than_the_outbox_is_not_a_slow_consumer() -> None:
    async with run_hub(make_settings(outbox_limit=5)) as running:
        first = await running.publish("threat_detected", THREAT)
        missed = [(await running.publish("threat_detected", THREAT)).id for _ in range(50)]
        ws = await connected(running.ws_url, make_token(),
                             additional_headers={"Last-Event-ID": first.id})
        assert [(await recv_json(ws))["id"] for _ in missed] == missed
        assert (await recv_json(ws))["type"] == "resumed"
        assert running.hub.metrics.slow_consumers.labels("websocket")._value.get() == 0
        await ws.close()
