"""One id per event, the legacy channel's exactly-once claim, malformed stream entries and
measured health, against real redis-server processes (hub.dispatch.redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from hub.dispatch.ledger import Ids
from hub.dispatch.scripts import APPEND, append_event
from hub.events import Event, now_timestamp
from tests.conftest import RedisServer, make_settings, make_token, run_hub
from tests.helpers import HEALTH, THREAT, connected, recv_json, send_json, wait_until


def _event(ids: Ids, n: int) -> Event:
    return Event(id=ids.next(int(asyncio.get_running_loop().time() * 1000) + 10**12),
                 type="cost_threshold_alert", timestamp=now_timestamp(),
                 data={"severity": "info", "message": "m", "n": n})


async def test_an_append_retried_or_replayed_is_stored_once_under_its_id(
        redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    script = client.register_script(APPEND)
    key = make_settings().stream_key
    ids = Ids()
    first = _event(ids, 1)
    assert await append_event(script, key, 100, first, "a", relocate=False) == \
        ("added", first.id)
    # The reply was lost and the publisher retries; a journal replays it after a crash.
    assert (await append_event(script, key, 100, first, "a", relocate=False))[0] == "present"
    assert (await append_event(script, key, 100, first, "a", relocate=True))[0] == "present"
    # Another source moved the stream past an id chosen earlier (during an outage).
    late = Event(id="1-5", type="system_status", timestamp=now_timestamp(),
                 data={"status": "online"})
    assert (await append_event(script, key, 100, late, "b", relocate=False))[0] == "stale"
    outcome, position = await append_event(script, key, 100, late, "b", relocate=True)
    assert outcome == "moved" and position != late.id
    assert (await append_event(script, key, 100, late, "b", relocate=True))[0] == "present"
    entries: Any = await client.xrange(key)
    assert [e[1].get(b"i", e[0]).decode() for e in entries] == [first.id, late.id]
    await client.aclose()


async def test_an_event_appended_late_keeps_its_id_for_live_and_resumed_clients(
        redis_server: RedisServer) -> None:
    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as running:
        # The instance's "online" announcement reaches clients once its reader reads it
        # back, which on a slow machine may be after this client subscribed to
        # system_status (and ahead of the marker below): connect once it was delivered.
        await wait_until(lambda: running.hub.dispatcher.last_delivered > (0, 0),
                         what="the instance's own announcement to be delivered")
        ws = await connected(running.ws_url, make_token())
        await send_json(ws, {"action": "subscribe", "event_types": ["system_status"]})
        await recv_json(ws)
        client = aioredis.Redis.from_url(redis_server.url)
        script = client.register_script(APPEND)
        marker = await running.publish("system_status", {"status": "config_change"})
        assert (await recv_json(ws, skip_status=False))["id"] == marker.id
        late = Event(id="1-7", type="system_status", timestamp=now_timestamp(),
                     data={"status": "degraded"})
        assert (await append_event(script, settings.stream_key, 1000, late, "other",
                                   relocate=True))[0] == "moved"
        assert (await recv_json(ws, skip_status=False))["id"] == "1-7"
        # A client that resumes from the late event's id gets what followed it, not
        # everything after 1-7 by id.
        after = await running.publish("system_status", {"status": "online"})
        assert (await recv_json(ws, skip_status=False))["id"] == after.id
        other = await connected(running.ws_url, make_token())
        await send_json(other, {"action": "subscribe", "event_types": ["system_status"],
                                "last_event_id": "1-7"})
        replayed = []
        while True:
            message = await recv_json(other, skip_status=False)
            if message["type"] == "resumed":
                break
            if message["type"] == "system_status":
                replayed.append(message["id"])
        assert replayed == [after.id]
        await client.aclose()
        await ws.close()
        await other.close()


async def test_identical_legacy_envelopes_each_arrive_once_whichever_instances_listen(
        redis_server: RedisServer) -> None:
    """The proxy flaps a provider: healthy→degraded, degraded→healthy, healthy→degraded,
    identical envelopes a moment apart. Two instances (then a third that subscribed late,
    then the third alone) deliver each PUBLISH exactly once."""
    settings = make_settings(redis_url=redis_server.url)
    channel = settings.legacy_channel
    raw = redis_server.client()
    down = orjson.dumps({"type": "provider_health_change",
                         "timestamp": "2025-01-15T10:30:00Z", "data": HEALTH})
    up = orjson.dumps({"type": "provider_health_change", "timestamp": "2025-01-15T10:30:00Z",
                       "data": {**HEALTH, "old_status": "degraded", "new_status": "healthy"}})

    async def statuses(ws: Any, marker: str) -> list[str]:
        seen: list[str] = []
        while True:
            message = await recv_json(ws, skip_status=False)
            if message["id"] == marker:
                return seen
            if message["type"] == "provider_health_change":
                seen.append(message["data"]["new_status"])

    async with run_hub(settings) as a, run_hub(settings.replace(instance_id="b")) as b:
        watchers = [await connected(h.ws_url, make_token()) for h in (a, b)]
        await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 2,
                         what="both instances to subscribe")
        for payload in (down, up, down, down, down):
            raw.publish(channel, payload)
        await wait_until(lambda: sum(h.hub.metrics.legacy.labels(r)._value.get()
                                     for h in (a, b) for r in ("appended", "duplicate")) == 10,
                         what="both instances to read all five")
        marker = await a.publish("system_status", {"status": "config_change"})
        expected = ["degraded", "healthy", "degraded", "degraded", "degraded"]
        for ws in watchers:
            assert await statuses(ws, marker.id) == expected
        async with run_hub(settings.replace(instance_id="c")) as c:
            late = await connected(c.ws_url, make_token())
            await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 3,
                             what="the third instance to subscribe")
            for payload in (down, down, up):
                raw.publish(channel, payload)
            await wait_until(lambda: sum(h.hub.metrics.legacy.labels(r)._value.get()
                                         for h in (a, b, c) for r in ("appended", "duplicate"))
                             == 10 + 9, what="the three instances to read all three")
            marker = await a.publish("system_status", {"status": "config_change"})
            for ws in [*watchers, late]:
                assert await statuses(ws, marker.id) == ["degraded", "degraded", "healthy"]
            await watchers[0].close()
            await watchers[1].close()
        # (a and b stop here)
    async with run_hub(settings.replace(instance_id="c2")) as alone:
        ws = await connected(alone.ws_url, make_token())
        await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 1,
                         what="the last instance to subscribe")
        for payload in (down, down):
            raw.publish(channel, payload)
        await wait_until(lambda: alone.hub.metrics.legacy.labels("appended")._value.get() == 2,
                         what="the last instance to append both")
        marker = await alone.publish("system_status", {"status": "config_change"})
        assert await statuses(ws, marker.id) == ["degraded", "degraded"]
        await ws.close()
    raw.close()


async def test_malformed_stream_entries_are_counted_and_skipped_live_and_on_resume(
        redis_server: RedisServer) -> None:
    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as running:
        ws = await connected(running.ws_url, make_token())
        before = await running.publish("threat_detected", THREAT)
        assert (await recv_json(ws))["id"] == before.id
        client = aioredis.Redis.from_url(redis_server.url)
        for fields in ({"e": b'{"type":"threat_detected","timestamp":"x","data":[1,2]}'},
                       {"e": b"not json"}, {"e": b'"a string"'}, {"x": b"no body"},
                       {"e": b'{"type":7,"timestamp":"x","data":{}}'}):
            await client.xadd(settings.stream_key, fields)  # type: ignore[arg-type]
        after = await running.publish("threat_detected", THREAT)
        assert (await recv_json(ws))["id"] == after.id  # the reader went on
        assert running.hub.metrics.malformed_entries._value.get() == 5
        other = await connected(running.ws_url, make_token())  # resumes across them
        await send_json(other, {"action": "subscribe", "event_types": ["threat_detected"],
                                "last_event_id": before.id})
        messages = [await recv_json(other) for _ in range(3)]
        assert [m["type"] for m in messages] == ["subscription_updated", "threat_detected",
                                                 "resumed"]
        assert messages[1]["id"] == after.id
        assert running.hub.dispatcher.backend.loops["stream"].done() is False
        await client.aclose()
        await ws.close()
        await other.close()


async def test_a_stuck_reader_turns_health_degraded_and_markers_never_reach_clients(
        redis_server: RedisServer) -> None:
    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as running, httpx.AsyncClient() as http:
        ws = await connected(running.ws_url, make_token())
        backend = running.hub.dispatcher.backend
        # Markers go round while nothing is published: none reaches a client.
        await wait_until(lambda: backend.round_trip_s > 0, what="a health round trip")
        delivered = running.hub.metrics.delivered.labels("system_status")._value.get()
        event = await running.publish("cost_threshold_alert",
                                      {"severity": "info", "message": "after markers"})
        assert (await recv_json(ws))["id"] == event.id
        # Measured health can read degraded for a moment after a stall on a loaded
        # machine (the reader's lag, a marker's round trip, within 2 s): poll it.
        deadline = asyncio.get_running_loop().time() + 20
        while (body := (await http.get(f"{running.url}/ws/health")).json()
               )["status"] != "healthy":
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.05)
        assert body["reasons"] == []
        metrics = (await http.get(f"{running.url}/metrics")).text
        for name in ("hub_redis_reader_lag_seconds", "hub_redis_round_trip_seconds",
                     "hub_journal_events"):
            assert name in metrics
        assert running.hub.metrics.delivered.labels("system_status")._value.get() == delivered

        backend.loops["stream"].cancel()  # the reader stops reading, its connection up
        async def degraded() -> dict[str, Any]:
            while True:
                body = (await http.get(f"{running.url}/ws/health")).json()
                if body["status"] == "degraded":
                    return dict(body)
                await asyncio.sleep(0.1)  # polling health: it offers nothing to await
        body = await asyncio.wait_for(degraded(), 15)
        assert any("behind the stream head" in r or "marker" in r for r in body["reasons"])
        assert body["redis_connected"] is True  # subscribed, yet not delivering: degraded
        await ws.close()


async def test_publish_during_an_outage_says_not_durable_and_is_journalled(
        own_redis: RedisServer) -> None:
    settings = make_settings(redis_url=own_redis.url)
    admin = {"Authorization": f"Bearer {make_token('pub', role='admin')}"}
    async with run_hub(settings) as a, run_hub(settings.replace(instance_id="b")) as b, \
            httpx.AsyncClient(timeout=30) as http:
        ws_b = await connected(b.ws_url, make_token())
        ok = (await http.post(f"{a.url}/events", headers=admin,
                              json={"type": "threat_detected", "data": THREAT})).json()
        assert ok["durable"] is True
        assert (await recv_json(ws_b))["id"] == ok["id"]
        own_redis.stop()
        held = (await http.post(f"{a.url}/events", headers=admin,
                                json={"type": "threat_detected", "data": THREAT})).json()
        assert held["durable"] is False
        journal = a.hub.dispatcher.backend.journal
        assert len(journal) >= 1 and held["id"] in journal.path.read_text()
        own_redis.start()
        assert (await recv_json(ws_b, timeout=30))["id"] == held["id"]
        await wait_until(lambda: len(journal) == 0, timeout=20, what="the journal to drain")
        await ws_b.close()


async def test_a_retried_post_with_an_idempotency_key_is_published_once(
        redis_hubs: tuple[Any, Any]) -> None:
    """The publisher's first reply was lost; it retries (here: on the other instance)."""
    a, b = redis_hubs
    ws = await connected(b.ws_url, make_token())
    await send_json(ws, {"action": "subscribe", "event_types": ["cost_threshold_alert"]})
    await recv_json(ws)
    body = {"type": "cost_threshold_alert", "data": {"severity": "info", "message": "once"}}

    def headers(user: str, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(user, role='admin')}",
                "Idempotency-Key": key}

    async with httpx.AsyncClient() as http:
        first = (await http.post(f"{a.url}/events", headers=headers("p", "k1"), json=body))
        again = (await http.post(f"{b.url}/events", headers=headers("p", "k1"), json=body))
        other = (await http.post(f"{a.url}/events", headers=headers("q", "k1"), json=body))
        bad = await http.post(f"{a.url}/events", headers=headers("p", "x" * 300), json=body)
    assert first.status_code == again.status_code == other.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    assert other.json()["id"] != first.json()["id"]  # keys are per publisher
    assert bad.status_code == 400
    assert [(await recv_json(ws))["id"] for _ in range(2)] == [first.json()["id"],
                                                               other.json()["id"]]
    marker = await a.publish("cost_threshold_alert", {"severity": "info", "message": "end"})
    assert (await recv_json(ws))["id"] == marker.id  # nothing in between: no third copy
    await ws.close()


async def test_at_the_journal_bound_publishes_are_refused_not_dropped(
        own_redis: RedisServer) -> None:
    settings = make_settings(redis_url=own_redis.url, journal_max_events=3)
    admin = {"Authorization": f"Bearer {make_token('pub', role='admin')}"}
    body = {"type": "cost_threshold_alert", "data": {"severity": "info", "message": "m"}}
    async with run_hub(settings) as running, httpx.AsyncClient(timeout=30) as http:
        ws = await connected(running.ws_url, make_token())
        # Its "online" announcement read back first: one not read back yet when Redis
        # goes is taken over into the journal, and takes one of its three places.
        await wait_until(lambda: not running.hub.dispatcher.backend.ledger.unread,
                         what="the instance's own announcement to be read back")
        own_redis.stop()
        replies = [await http.post(f"{running.url}/events", headers=admin, json=body)
                   for _ in range(4)]
        assert [r.status_code for r in replies] == [202, 202, 202, 503]
        assert replies[3].json()["error"]["code"] == "journal_full"
        assert running.hub.metrics.journal_full._value.get() == 1
        accepted = [r.json()["id"] for r in replies[:3]]
        assert [(await recv_json(ws))["id"] for _ in range(3)] == accepted
        own_redis.start()
        backend = running.hub.dispatcher.backend
        await wait_until(lambda: len(backend.journal) == 0, timeout=20,
                         what="the journal to drain")
        entries: Any = own_redis.client().xrange(settings.stream_key)
        stored = [f.get(b"i", i).decode() for i, f in entries
                  if b"e" in f and orjson.loads(f[b"e"])["type"] == "cost_threshold_alert"]
        assert stored == accepted
        await ws.close()


async def test_a_graceful_stop_waits_for_the_journal_then_logs_what_it_leaves(
        own_redis: RedisServer, capfd: Any) -> None:
    settings = make_settings(redis_url=own_redis.url, shutdown_timeout_s=0.5)
    async with run_hub(settings.replace(instance_id="watcher")) as watcher:
        ws = await connected(watcher.ws_url, make_token())
        async with run_hub(settings) as first:
            # Its "online" announcement read back first: one not read back yet when Redis
            # goes is taken over into the journal, a third event left there.
            await wait_until(lambda: not first.hub.dispatcher.backend.ledger.unread,
                             what="the instance's own announcement to be read back")
            own_redis.stop()
            event = await first.publish("threat_detected", THREAT)
            assert event.shared is False
        # uvicorn's log config writes to stderr (and replaces pytest's caplog handler).
        assert "stopping with 2 acknowledged event(s) not in redis yet" in capfd.readouterr().err
        # (the event and the instance's "shutdown" announcement)
        own_redis.start()
        async with run_hub(settings.replace(instance_id="next")):
            got = await recv_json(ws, timeout=30)
            assert got["id"] == event.id
        await ws.close()
