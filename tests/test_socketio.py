"""Socket.IO at /socket.io/ with python-socketio's official AsyncClient."""

from __future__ import annotations

import asyncio

import pytest
import socketio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.connection import Path
from tests.conftest import RunningHub, make_settings, make_token, run_hub
from tests.helpers import HEALTH, THREAT, client_frame, stalled_client, wait_until
from tests.sio_helpers import SioClient


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_events_arrive_with_the_type_as_event_name(any_hub: RunningHub,
                                                         transport: str) -> None:
    client = SioClient()
    await client.connect(any_hub.url, auth={"token": make_token()}, transports=[transport])
    published = await any_hub.publish("threat_detected", THREAT)
    envelope = await client.next_event()
    assert envelope == {"id": published.id, "type": "threat_detected",
                        "timestamp": published.timestamp, "data": published.data}
    await client.close()


async def test_connection_established_names_user_and_instance(memory_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token("zoe"),
                                               "event_types": ["threat_detected"]})
    hello = await client.next_other("connection_established")
    assert hello["user_id"] == "zoe"
    assert hello["instance_id"] == memory_hub.hub.settings.instance_id
    assert hello["event_types"] == ["threat_detected"]
    assert hello["connection_id"] == client.client.get_sid()
    await client.close()


async def test_subscribe_and_unsubscribe_acknowledge(any_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(any_hub.url, auth={"token": make_token()})
    ack = await client.call("subscribe", {"event_types": ["provider_health_change"]})
    assert ack == {"subscribed_to": ["provider_health_change"]}
    await any_hub.publish("threat_detected", THREAT)
    health = await any_hub.publish("provider_health_change", HEALTH)
    assert (await client.next_event())["id"] == health.id

    ack = await client.call("subscribe", {"event_types": ["threat_detected"]})
    assert ack == {"subscribed_to": ["provider_health_change", "threat_detected"]}
    ack = await client.call("unsubscribe", {"event_types": ["provider_health_change"]})
    assert ack == {"subscribed_to": ["threat_detected"]}
    await any_hub.publish("provider_health_change", HEALTH)
    threat = await any_hub.publish("threat_detected", THREAT)
    assert (await client.next_event())["id"] == threat.id
    await client.close()


@pytest.mark.parametrize(("payload", "code"), [
    ({"event_types": [None]}, "invalid_event_types"),
    ({"event_types": "threat_detected"}, "invalid_event_types"),
    ("threat_detected", "not_an_object"),
    (None, "not_an_object"),  # an emit without arguments once left the client without ack
    ({"event_types": ["threat_detected"], "last_event_id": "yesterday"},
     "invalid_last_event_id"),
])
async def test_bad_subscribe_gets_an_error_ack(memory_hub: RunningHub, payload: object,
                                               code: str) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token()})
    ack = await client.call("subscribe", payload)
    assert ack["error"]["code"] == code
    assert ack["error"]["message"]
    assert client.client.connected
    await client.close()


async def test_auth_event_types_choose_the_initial_rooms(memory_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token(),
                                               "event_types": ["provider_health_change"]})
    await memory_hub.publish("threat_detected", THREAT)
    health = await memory_hub.publish("provider_health_change", HEALTH)
    assert (await client.next_event())["id"] == health.id
    await client.close()


@pytest.mark.parametrize("auth", [
    None,
    {"token": make_token(secret="another-secret-that-is-also-long-enough!")},
    {"token": make_token(ttl=-5)},
    {"token": "garbage"},
], ids=["missing", "forged", "expired", "malformed"])
async def test_refusal_is_connect_error_with_code_4003(memory_hub: RunningHub,
                                                       auth: dict[str, str] | None) -> None:
    client = SioClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(memory_hub.url, auth=auth)
    error = await client.connect_error
    assert error["message"] == "unauthorized"
    assert error["data"]["code"] == 4003


async def test_token_from_header_and_cookie(memory_hub: RunningHub) -> None:
    by_header = SioClient()
    await by_header.connect(memory_hub.url,
                            headers={"Authorization": f"Bearer {make_token('h')}"})
    by_cookie = SioClient()
    await by_cookie.connect(memory_hub.url,
                            headers={"Cookie": f"ks_access_token=Bearer%20{make_token('c')}"})
    event = await memory_hub.publish("threat_detected", THREAT)
    assert (await by_header.next_event())["id"] == event.id
    assert (await by_cookie.next_event())["id"] == event.id
    await by_header.close()
    await by_cookie.close()


async def test_foreign_origin_is_refused(memory_hub: RunningHub) -> None:
    client = SioClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(memory_hub.url, auth={"token": make_token()},
                             headers={"Origin": "https://evil.example"})


async def test_tenant_isolation_over_socketio() -> None:
    async with run_hub(make_settings()) as running:
        acme, globex = SioClient(), SioClient()
        await acme.connect(running.url, auth={"token": make_token("a", tenant_id="acme")})
        await globex.connect(running.url, auth={"token": make_token("g", tenant_id="globex")})
        private = await running.publish("threat_detected", {**THREAT, "tenant_id": "acme"})
        public = await running.publish("threat_detected", THREAT)
        assert (await acme.next_event())["id"] == private.id
        assert (await acme.next_event())["id"] == public.id
        assert (await globex.next_event())["id"] == public.id
        await acme.close()
        await globex.close()


async def test_token_expiry_disconnects(memory_hub: RunningHub) -> None:
    client = SioClient()
    # Valid for 5 to 6 s (exp is whole seconds): the connect, however slow the machine,
    # comes well before the expiry.
    await client.connect(memory_hub.url, auth={"token": make_token(ttl=6)})
    import asyncio

    await asyncio.wait_for(client.disconnected.wait(), 30)
    assert (await client.next_other("token_expired"))["code"] == 4003


async def test_slow_socketio_consumer_is_disconnected_and_others_keep_receiving() -> None:
    async with run_hub(make_settings(outbox_limit=50)) as running:
        # Engine.IO over a raw socket: open the namespace with a token, then stop reading.
        _reader, stalled = await stalled_client(
            running.port, make_token("slow"), path="/socket.io/?EIO=4&transport=websocket")
        import orjson

        stalled.write(client_frame("40" + orjson.dumps({"token": make_token("slow")}).decode()))
        await wait_until(lambda: len(running.hub.socketio.connections) == 1,
                         what="the stalled Socket.IO client to connect")
        fast = SioClient()
        await fast.connect(running.url, auth={"token": make_token("fast")})
        kicked = running.hub.metrics.slow_consumers.labels("socketio")
        big = {"severity": "info", "message": "x" * 32_000}
        sent = 0
        while kicked._value.get() == 0 and sent < 5_000:
            await running.publish("cost_threshold_alert", {**big, "n": sent})
            assert (await fast.next_event("cost_threshold_alert"))["data"]["n"] == sent
            sent += 1
        assert kicked._value.get() == 1
        rooms = running.hub.dispatcher.rooms["cost_threshold_alert"]
        await wait_until(lambda: len(rooms) == 1, what="the slow socket to leave its rooms")
        assert [c.principal.user_id for c in rooms] == ["fast"]
        stalled.transport.abort()
        await fast.close()


async def test_events_stay_in_order_across_the_polling_to_websocket_upgrade(
        memory_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token(),
                                               "event_types": ["cost_threshold_alert"]},
                         transports=["polling", "websocket"])
    sent = []
    for n in range(300):  # publishing while the client upgrades
        sent.append((await memory_hub.publish(
            "cost_threshold_alert", {"severity": "info", "message": "m", "n": n})).id)
        if n % 10 == 0:
            await asyncio.sleep(0)  # let the upgrade proceed between publishes
    got = [(await client.next_event())["id"] for _ in sent]
    assert got == sent
    assert client.client.transport() == "websocket"
    conn = next(iter(memory_hub.hub.socketio.connections.values()))
    assert conn.outbox.path is Path.DIRECT  # events now go straight to the upgraded WebSocket
    await client.close()


payloads = st.one_of(
    st.none(), st.integers(-(2**53), 2**53), st.text(max_size=30),
    st.lists(st.text(max_size=25), max_size=4),
    st.dictionaries(st.sampled_from(["event_types", "last_event_id", "x"]),
                    st.one_of(st.none(), st.text(max_size=25),
                              st.lists(st.text(max_size=25), max_size=4)), max_size=3),
)


@given(st.lists(st.tuples(st.sampled_from(["subscribe", "unsubscribe", "nonsense"]), payloads),
                min_size=1, max_size=8))
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_fuzzed_socketio_events_never_break_the_socket(
        memory_hub: RunningHub, calls: list[tuple[str, object]]) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token()})
    for name, payload in calls:
        if name == "nonsense":
            await client.client.emit(name, payload)  # no handler: ignored
            continue
        ack = await client.call(name, payload)
        assert (set(ack) in ({"subscribed_to"}, {"subscribed_to", "unknown_event_types"},
                             {"error"}) or "replayed" in ack)
    # Still connected and still delivering.
    await client.call("subscribe", {"event_types": ["threat_detected"]})
    event = await memory_hub.publish("threat_detected", THREAT)
    assert (await client.next_event("threat_detected"))["id"] == event.id
    await client.close()
