"""/ws/events end to end: real uvicorn servers, the official ``websockets`` client."""

from __future__ import annotations

import time
from urllib.parse import quote

import jwt
import orjson
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningHub, make_settings, make_token, run_hub
from tests.helpers import (
    HEALTH,
    THREAT,
    close_code,
    connected,
    recv_json,
    recv_type,
    send_json,
    stalled_client,
    wait_until,
    ws_connect,
)


async def test_connection_established_then_events(any_hub: RunningHub) -> None:
    ws = await ws_connect(any_hub.ws_url, make_token("alice"))
    hello = await recv_json(ws)
    assert hello["type"] == "connection_established"
    assert hello["data"]["user_id"] == "alice"
    assert hello["data"]["instance_id"] == any_hub.hub.settings.instance_id
    assert set(hello["data"]["event_types"]) == {
        "threat_detected", "provider_health_change", "cost_threshold_alert", "system_status"}
    assert hello["data"]["connection_id"]
    published = await any_hub.publish("threat_detected", THREAT)
    event = await recv_type(ws, "threat_detected")
    assert event["id"] == published.id
    assert event["timestamp"].endswith("Z")
    assert event["data"]["severity"] == "high"
    assert event["data"]["threat_id"].startswith("thr_")
    assert set(event) == {"id", "type", "timestamp", "data"}
    await ws.close()


async def test_subscribe_narrows_then_adds_and_unsubscribe_removes(any_hub: RunningHub) -> None:
    ws = await connected(any_hub.ws_url, make_token())
    await send_json(ws, {"action": "subscribe", "event_types": ["provider_health_change"]})
    ack = await recv_json(ws)
    assert ack["type"] == "subscription_updated"
    assert ack["data"]["subscribed_to"] == ["provider_health_change"]
    await any_hub.publish("threat_detected", THREAT)  # filtered out
    health = await any_hub.publish("provider_health_change", HEALTH)
    assert (await recv_json(ws))["id"] == health.id

    await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"]})
    ack = await recv_json(ws)
    assert ack["data"]["subscribed_to"] == ["provider_health_change", "threat_detected"]
    threat = await any_hub.publish("threat_detected", THREAT)
    assert (await recv_json(ws))["id"] == threat.id

    await send_json(ws, {"action": "unsubscribe", "event_types": ["threat_detected"]})
    assert (await recv_json(ws))["data"]["subscribed_to"] == ["provider_health_change"]
    await any_hub.publish("threat_detected", THREAT)
    last = await any_hub.publish("provider_health_change", HEALTH)
    assert (await recv_json(ws))["id"] == last.id  # the threat in between never arrived
    await ws.close()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "not_an_object"),
        ('{"action": "dance"}', "unknown_action"),
        ('{"action": "subscribe", "event_types": [1]}', "invalid_event_types"),
        ('{"action": "subscribe", "event_types": "threat_detected"}', "invalid_event_types"),
        ('{"action": "subscribe"}', "invalid_event_types"),
        ('{"action": "subscribe", "event_types": [], "last_event_id": "x"}',
         "invalid_last_event_id"),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_survives(
        memory_hub: RunningHub, message: str, code: str) -> None:
    ws = await connected(memory_hub.ws_url, make_token())
    await ws.send(message)
    reply = await recv_type(ws, "error")
    assert reply["data"]["code"] == code
    assert reply["data"]["message"]
    await send_json(ws, {"action": "ping"})
    assert (await recv_type(ws, "pong"))["type"] == "pong"
    await ws.close()


async def test_ping_pong(memory_hub: RunningHub) -> None:
    ws = await connected(memory_hub.ws_url, make_token())
    await send_json(ws, {"action": "ping"})
    assert (await recv_json(ws))["type"] == "pong"
    await ws.close()


def _none_token() -> str:
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(
        f'{{"sub":"mallory","role":"admin","exp":{int(time.time()) + 600}}}'.encode()).decode()
    return f"{header}.{body}."


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "no token"),
        (make_token(secret="another-secret-that-is-also-long-enough!"), "bad token signature"),
        (make_token(ttl=-60), "token expired"),
        (_none_token(), "token algorithm not allowed"),
        ("not.a.jwt", "malformed token"),
    ],
    ids=["missing", "forged", "expired", "alg-none", "malformed"],
)
async def test_refused_tokens_close_with_4003(memory_hub: RunningHub, token: str | None,
                                               reason: str) -> None:
    ws = await ws_connect(memory_hub.ws_url, token)
    code, got_reason = await close_code(ws)
    assert code == 4003
    assert got_reason == reason
    assert token is None or token not in got_reason


async def test_token_in_query_string_is_not_accepted(memory_hub: RunningHub) -> None:
    ws = await ws_connect(f"{memory_hub.ws_url}?token={make_token()}")
    assert (await close_code(ws))[0] == 4003


@pytest.mark.parametrize("cookie_value", [
    "{token}", "Bearer {token}", quote("Bearer {token}"),
], ids=["plain", "bearer-prefixed", "url-encoded"])
async def test_cookie_authentication(memory_hub: RunningHub, cookie_value: str) -> None:
    token = make_token("carol")
    cookie = "theme=dark; ks_access_token=" + cookie_value.format(token=token).replace(
        quote("{token}"), token)
    ws = await ws_connect(memory_hub.ws_url, additional_headers={"Cookie": cookie})
    hello = await recv_json(ws)
    assert hello["data"]["user_id"] == "carol"
    await ws.close()


async def test_foreign_browser_origin_is_refused(memory_hub: RunningHub) -> None:
    ws = await ws_connect(memory_hub.ws_url, make_token(), origin="https://evil.example")
    assert await close_code(ws) == (4003, "origin not allowed")
    same = await ws_connect(memory_hub.ws_url, make_token(),
                            origin=f"http://127.0.0.1:{memory_hub.port}")
    assert (await recv_json(same))["type"] == "connection_established"
    await same.close()


async def test_listed_origin_is_allowed() -> None:
    settings = make_settings(allowed_origins=("https://dash.example.com",))
    async with run_hub(settings) as running:
        ok = await ws_connect(running.ws_url, make_token(), origin="https://dash.example.com")
        assert (await recv_json(ok))["type"] == "connection_established"
        await ok.close()
        own = await ws_connect(running.ws_url, make_token(),
                               origin=f"http://127.0.0.1:{running.port}")
        assert (await close_code(own))[0] == 4003  # with a list, only the list counts


async def test_tenant_isolation() -> None:
    async with run_hub(make_settings()) as running:
        acme = await connected(running.ws_url, make_token("a", tenant_id="acme"))
        globex = await connected(running.ws_url, make_token("g", tenant_id="globex"))
        admin = await connected(running.ws_url, make_token("root", role="admin"))
        for ws in (acme, globex, admin):
            await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"]})
            await recv_json(ws)
        secret = await running.publish("threat_detected", {**THREAT, "tenant_id": "acme"})
        public = await running.publish("threat_detected", THREAT)
        assert (await recv_json(acme))["id"] == secret.id
        assert (await recv_json(acme))["id"] == public.id
        assert (await recv_json(admin))["id"] == secret.id
        assert (await recv_json(globex))["id"] == public.id  # never saw acme's event
        for ws in (acme, globex, admin):
            await ws.close()


async def test_oversized_message_closes_with_1009() -> None:
    async with run_hub(make_settings(max_message_bytes=1024)) as running:
        ws = await connected(running.ws_url, make_token())
        await ws.send('{"action": "ping", "pad": "' + "x" * 4096 + '"}')
        assert (await close_code(ws))[0] == 1009


async def test_message_flood_closes_with_1008() -> None:
    async with run_hub(make_settings(client_rate=1, client_burst=5)) as running:
        ws = await connected(running.ws_url, make_token())
        for _ in range(20):
            try:
                await send_json(ws, {"action": "ping"})
            except websockets.ConnectionClosed:
                break
        code, reason = await close_code(ws)
        assert code == 1008
        assert "rate" in reason


async def test_token_expiry_closes_open_connection_with_4003(memory_hub: RunningHub) -> None:
    # exp is a whole second (make_token truncates now): ttl=6 leaves at least 5 s for the
    # handshake, which a stalled machine may need, before the token must be refused.
    ws = await connected(memory_hub.ws_url, make_token(ttl=6))
    assert await close_code(ws, timeout=30) == (4003, "token expired")


async def test_connection_limit_per_user() -> None:
    async with run_hub(make_settings(max_connections_per_user=1)) as running:
        first = await connected(running.ws_url, make_token("dave"))
        second = await ws_connect(running.ws_url, make_token("dave"))
        code, reason = await close_code(second)
        assert code == 1013
        assert "per-user" in reason
        other = await connected(running.ws_url, make_token("erin"))
        await first.close()
        await other.close()


async def test_slow_consumer_is_closed_with_4008_and_others_keep_receiving() -> None:
    async with run_hub(make_settings(outbox_limit=50)) as running:
        # A client that stops reading: the kernel buffers fill, then its outbox.
        _reader, stalled = await stalled_client(running.port, make_token("slow"))
        fast = await connected(running.ws_url, make_token("fast"))
        slow_metric = running.hub.metrics.slow_consumers.labels("websocket")
        big = {"severity": "info", "message": "x" * 32_000}
        sent = 0
        while slow_metric._value.get() == 0 and sent < 5_000:
            await running.publish("cost_threshold_alert", {**big, "n": sent})
            # The reading client gets every event, in order, while the other one stalls.
            assert (await recv_type(fast, "cost_threshold_alert"))["data"]["n"] == sent
            sent += 1
        assert slow_metric._value.get() == 1
        # Out of every room at once: its outbox is gone and it costs the broadcast nothing.
        rooms = running.hub.dispatcher.rooms["cost_threshold_alert"]
        assert [c.principal.user_id for c in rooms] == ["fast"]
        stalled.transport.abort()
        await wait_until(lambda: len(running.hub.websocket.connections) == 1,
                         what="the stalled connection to be released")
        await fast.close()


async def test_instance_connection_limit_and_subscribe_list_size() -> None:
    async with run_hub(make_settings(max_connections=1, max_subscribe_types=2)) as running:
        first = await connected(running.ws_url, make_token("a"))
        refused = await ws_connect(running.ws_url, make_token("b"))
        assert await close_code(refused) == (1013, "instance connection limit reached")
        await send_json(first, {"action": "subscribe", "event_types": [
            "threat_detected", "system_status", "cost_threshold_alert"]})
        assert (await recv_type(first, "error"))["data"]["code"] == "too_many_event_types"
        await first.close()
        await wait_until(lambda: running.hub.limits.total == 0, what="the slot to be freed")
        again = await connected(running.ws_url, make_token("b"))  # the slot came back
        await again.close()


@given(st.lists(st.one_of(
    st.text(max_size=50),
    st.binary(max_size=50).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from(["action", "event_types", "last_event_id", "x"]),
                    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
                              st.lists(st.text(max_size=25), max_size=3)),
                    max_size=4).map(lambda d: orjson.dumps(d).decode()),
), min_size=1, max_size=15))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
async def test_fuzzed_client_messages_never_break_the_connection(
        memory_hub: RunningHub, messages: list[str]) -> None:
    ws = await connected(memory_hub.ws_url, make_token())
    for message in messages:
        await ws.send(message)
    await send_json(ws, {"action": "ping"})
    # Whatever came before, every message got an answer and the connection still works.
    await recv_type(ws, "pong")
    await ws.close()
