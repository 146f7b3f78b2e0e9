"""``GET /events/stream`` (Server-Sent Events): the wire format, auth and refusals before
the stream, types and filters, resume from Last-Event-ID, heartbeat, expiry, slow-consumer
cut-off, shutdown, health and metrics; and real ``curl -N``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket

import httpx
import pytest

from tests.conftest import RunningHub, make_settings, make_token, run_hub
from tests.helpers import COST, HEALTH, THREAT, wait_until
from tests.sse_helpers import sse_connect, sse_refusal


async def test_events_arrive_with_id_event_and_envelope_data(any_hub: RunningHub) -> None:
    async with sse_connect(any_hub.url, make_token("alice")) as stream:
        retry = await stream.next()
        assert retry is not None and retry.retry == any_hub.hub.settings.sse_retry_ms
        hello = await stream.next_event()
        assert hello.event == "connection_established" and hello.id is None
        assert hello.json["type"] == "connection_established"
        assert hello.json["data"]["user_id"] == "alice"
        assert hello.json["data"]["connection_id"].startswith("sse_")
        published = await any_hub.publish("threat_detected", THREAT)
        event = await stream.next_event()
        assert (event.id, event.event) == (published.id, "threat_detected")
        assert event.json == published.envelope()
        health = (await httpx.AsyncClient().get(f"{any_hub.url}/ws/health")).json()
        assert health["connections"]["sse"] == 1 and health["active_connections"] == 1
        metrics = (await httpx.AsyncClient().get(f"{any_hub.url}/metrics")).text
        assert 'hub_connections{transport="sse"} 1.0' in metrics
    await wait_until(lambda: not any_hub.hub.sse.connections, what="the stream to be released")
    assert not any_hub.hub.dispatcher.rooms["threat_detected"]


async def test_cookie_auth_types_and_filter_parameters(memory_hub: RunningHub) -> None:
    params = {"types": "threat_detected,cost_threshold_alert", "min_severity": "high",
              "data.attack_type": "prompt_injection,jailbreak"}
    async with sse_connect(memory_hub.url, make_token(), params=params, cookie=True) as stream:
        hello = await stream.next_event("connection_established")
        assert hello.json["data"]["event_types"] == ["cost_threshold_alert", "threat_detected"]
        assert hello.json["data"]["filter"] == {"min_severity": "high",
                                                "attack_type": ["jailbreak", "prompt_injection"]}
        await memory_hub.publish("provider_health_change", HEALTH)  # not a type it takes
        await memory_hub.publish("threat_detected", {**THREAT, "severity": "medium"})
        await memory_hub.publish("threat_detected", {**THREAT, "attack_type": "exfiltration"})
        await memory_hub.publish("cost_threshold_alert", COST)  # warning < error
        wanted = await memory_hub.publish("cost_threshold_alert", {**COST, "severity": "error",
                                                                   "attack_type": "jailbreak"})
        last = await memory_hub.publish("threat_detected", {**THREAT, "severity": "critical"})
        got = [(await stream.next_event()).id for _ in range(2)]
        assert got == [wanted.id, last.id]


@pytest.mark.parametrize(("headers", "params", "status", "code"), [
    ({}, None, 401, "missing_token"),
    ({"authorization": "Bearer nope"}, None, 401, "malformed_token"),
    ({"origin": "https://evil.example"}, None, 403, "origin_not_allowed"),
    ({}, {"min_severity": "severe"}, 400, "invalid_filter"),
    ({}, {"data.provider": ""}, 400, "invalid_filter"),
    ({}, {"min_severty": "high"}, 400, "invalid_parameter"),
    ({}, {"types": "a,,b"}, 400, "invalid_event_types"),
    ({"last-event-id": "yesterday"}, None, 400, "invalid_last_event_id"),
])
async def test_refusals_are_json_before_the_stream(memory_hub: RunningHub, headers: dict[str, str],
                                                   params: dict[str, str] | None, status: int,
                                                   code: str) -> None:
    sent = {"authorization": f"Bearer {make_token()}", **headers}
    if status == 401 and "authorization" not in headers:
        del sent["authorization"]
    got, body = await sse_refusal(memory_hub.url, sent, params)
    assert (got, body["error"]["code"]) == (status, code)
    assert not memory_hub.hub.sse.connections


async def test_resume_from_last_event_id_header_and_parameter(any_hub: RunningHub) -> None:
    events = [await any_hub.publish("threat_detected", {**THREAT, "n": n}) for n in range(4)]
    for how in ("header", "param"):
        headers = {"last-event-id": events[1].id} if how == "header" else None
        params = {"last_event_id": events[1].id} if how == "param" else None
        async with sse_connect(any_hub.url, make_token(), headers=headers,
                               params=params) as stream:
            replayed = await stream.events_until("resumed")
            assert [e.id for e in replayed if e.event == "threat_detected"] == [
                e.id for e in events[2:]]
            live = await any_hub.publish("threat_detected", THREAT)
            assert (await stream.next_event()).id == live.id
            events.append(live)


async def test_heartbeat_comments_keep_the_stream_alive() -> None:
    async with run_hub(make_settings(sse_heartbeat_s=0.05)) as running, \
            sse_connect(running.url, make_token()) as stream:
        for _ in range(3):
            block = await stream.next()
            while block is not None and not block.comments:
                block = await stream.next()
            assert block is not None and block.comments == ["heartbeat"]


async def test_expiry_sends_token_expired_then_ends_the_stream(memory_hub: RunningHub) -> None:
    # exp is a whole second (make_token truncates now): ttl=6 leaves at least 5 s for the
    # stream to open, which a stalled machine may need, before the token must be refused.
    async with sse_connect(memory_hub.url, make_token(ttl=6)) as stream:
        expired = await stream.next_event("token_expired", timeout=30)
        assert expired.json["data"]["message"] == "token expired"
        assert await stream.next(timeout=10) is None  # the response ends


async def test_shutdown_flushes_the_notice_then_ends_the_stream() -> None:
    async with run_hub(make_settings()) as running, \
            sse_connect(running.url, make_token()) as stream:
        await stream.next_event("connection_established")
        await running.hub.drain()
        notice = await stream.next_event("system_status")
        assert notice.json["data"]["status"] == "shutdown"
        assert await stream.next(timeout=10) is None


async def test_a_slow_consumer_is_cut_off_and_others_keep_receiving() -> None:
    async with run_hub(make_settings(outbox_limit=20)) as running:
        token = make_token("slow")
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(f"GET /events/stream HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        await wait_until(lambda: len(running.hub.sse.connections) == 1, what="the stream")
        slow = running.hub.metrics.slow_consumers.labels("sse")
        async with sse_connect(running.url, make_token("fast")) as fast:
            await fast.next_event("connection_established")
            big = {"severity": "info", "message": "x" * 32_000}
            sent = 0
            while slow._value.get() == 0 and sent < 5_000:
                await running.publish("cost_threshold_alert", {**big, "n": sent})
                assert (await fast.next_event()).json["data"]["n"] == sent
                sent += 1
            assert slow._value.get() == 1
            # Dropped at once: out of every room, its descriptor closed by the server.
            await wait_until(lambda: len(running.hub.sse.connections) == 1,
                             what="the slow stream to be released")
            assert [c.principal.user_id for c in running.hub.sse.connections] == ["fast"]
            final = await running.publish("cost_threshold_alert", {**COST, "n": -1})
            assert (await fast.next_event()).id == final.id
        writer.close()


async def test_tenant_scoping(memory_hub: RunningHub) -> None:
    async with sse_connect(memory_hub.url, make_token(tenant_id="acme")) as stream:
        await stream.next_event("connection_established")
        await memory_hub.publish("threat_detected", {**THREAT, "tenant_id": "other"})
        mine = await memory_hub.publish("threat_detected", {**THREAT, "tenant_id": "acme"})
        assert (await stream.next_event()).id == mine.id


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_prints_events_as_they_are_published(memory_hub: RunningHub) -> None:
    curl = await asyncio.create_subprocess_exec(
        "curl", "-N", "-s", "-H", f"Authorization: Bearer {make_token()}",
        f"{memory_hub.url}/events/stream", stdout=asyncio.subprocess.PIPE)
    out = curl.stdout
    assert out is not None
    try:
        async def line_with(text: str) -> str:
            while True:
                line: str = (await asyncio.wait_for(out.readline(), 10)).decode()
                assert line, "curl's output ended"
                if text in line:
                    return line
        await line_with("event: connection_established")
        for n in range(3):  # each one printed before the next is published
            published = await memory_hub.publish("threat_detected", {**THREAT, "n": n})
            assert (await line_with("id: ")).strip() == f"id: {published.id}"
            assert (await line_with("data: ")).startswith('data: {"id":"' + published.id)
    finally:
        with contextlib.suppress(ProcessLookupError):
            curl.kill()
        await curl.wait()
