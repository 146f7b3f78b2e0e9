"""One filter, the same events everywhere: ``/ws/events`` (subscribe, and a replay),
Socket.IO (connect auth, and subscribe), SSE (query parameters), ``GET /events`` (query
parameters), on both backends; and a malformed filter is ``invalid_filter`` on each."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import socketio

from tests.conftest import RunningHub, make_token
from tests.helpers import COST, HEALTH, THREAT, connected, recv_json, recv_type, send_json
from tests.sio_helpers import SioClient
from tests.sse_helpers import sse_connect

TYPES = ["threat_detected", "cost_threshold_alert", "provider_health_change"]
FILTER: dict[str, Any] = {"min_severity": "high", "provider": ["openai", "azure"]}
PARAMS = {"types": ",".join(TYPES), "min_severity": "high", "data.provider": "openai,azure"}


def mix() -> list[tuple[str, dict[str, Any]]]:
    """Events on both sides of each key (severity, provider, types without an order)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for provider in ("openai", "azure", "gcp", None):
        extra = {"provider": provider} if provider else {}
        for severity in ("low", "medium", "high", "critical"):
            out.append(("threat_detected", {**THREAT, "severity": severity, **extra}))
        for severity in ("info", "warning", "error", "critical"):
            out.append(("cost_threshold_alert", {**COST, "severity": severity, **extra}))
        if provider:
            out.append(("provider_health_change", {**HEALTH, "provider": provider}))
    out.append(("system_status", {"status": "online", "provider": "openai"}))  # not a type
    return out


async def ws_until(ws: Any, last: str) -> list[str]:
    ids: list[str] = []
    while True:
        message = await recv_json(ws)
        if message["type"] in TYPES:
            ids.append(message["id"])
            if message["id"] == last:
                return ids


async def sio_until(sio: SioClient, last: str) -> list[str]:
    ids: list[str] = []
    while True:
        envelope = await sio.next_event()
        ids.append(envelope["id"])
        if envelope["id"] == last:
            return ids


async def test_the_same_filter_gives_the_same_events_everywhere(any_hub: RunningHub) -> None:
    token = make_token()
    start = await any_hub.publish("system_status", {"status": "online"})
    ws = await connected(any_hub.ws_url, token)
    await send_json(ws, {"action": "subscribe", "event_types": TYPES, "filter": FILTER})
    ack = await recv_type(ws, "subscription_updated")
    assert ack["data"]["filter"] == {"min_severity": "high", "provider": ["azure", "openai"]}
    sio_auth = SioClient()
    await sio_auth.connect(any_hub.url, auth={"token": token, "event_types": TYPES,
                                              "filter": FILTER})
    sio_sub = SioClient()
    await sio_sub.connect(any_hub.url, auth={"token": token})
    reply = await sio_sub.call("subscribe", {"event_types": TYPES, "filter": FILTER})
    assert reply["filter"] == ack["data"]["filter"]
    async with sse_connect(any_hub.url, token, params=PARAMS) as sse:
        await sse.next_event("connection_established")
        published = [await any_hub.publish(t, d) for t, d in mix()]
        last = await any_hub.publish("threat_detected", {**THREAT, "severity": "critical",
                                                         "provider": "azure"})
        published.append(last)
        expected = [e.id for e in published
                    if e.type in TYPES and e.data.get("provider") in ("openai", "azure")
                    and e.data.get("severity", "high") in ("high", "error", "critical")]
        assert 0 < len(expected) < len([e for e in published if e.type in TYPES])
        live_ws = await ws_until(ws, last.id)
        live_auth = await sio_until(sio_auth, last.id)
        live_sub = await sio_until(sio_sub, last.id)
        live_sse: list[str] = []
        while not live_sse or live_sse[-1] != last.id:
            live_sse.append((await sse.next_event()).id or "")
    async with httpx.AsyncClient() as http:
        history = (await http.get(f"{any_hub.url}/events", params={**PARAMS, "after": start.id},
                                  headers={"authorization": f"Bearer {token}"})).json()
    replay_ws = await connected(any_hub.ws_url, token)
    await send_json(replay_ws, {"action": "subscribe", "event_types": TYPES, "filter": FILTER,
                                "last_event_id": start.id})
    replayed: list[str] = []
    while (message := await recv_json(replay_ws))["type"] != "resumed":
        if message["type"] in TYPES:
            replayed.append(message["id"])
    async with sse_connect(any_hub.url, token, params=PARAMS,
                           headers={"last-event-id": start.id}) as sse_replay:
        sse_replayed = [e.id for e in await sse_replay.events_until("resumed")
                        if e.event in TYPES]
    assert live_ws == live_auth == live_sub == live_sse == expected
    assert [e["id"] for e in history["events"]] == expected
    assert replayed == sse_replayed == expected
    for client in (ws, replay_ws):
        await client.close()
    await sio_auth.close()
    await sio_sub.close()


async def test_a_malformed_filter_is_invalid_filter_on_every_transport(
        memory_hub: RunningHub) -> None:
    token = make_token()
    ws = await connected(memory_hub.ws_url, token)
    await send_json(ws, {"action": "subscribe", "event_types": TYPES,
                         "filter": {"min_severity": "severe"}})
    error = await recv_type(ws, "error")
    assert error["data"]["code"] == "invalid_filter"
    # Nothing changed: the connection still takes every type, unfiltered.
    published = await memory_hub.publish("threat_detected", {**THREAT, "severity": "low"})
    assert (await recv_type(ws, "threat_detected"))["id"] == published.id
    await ws.close()
    sio = SioClient()
    await sio.connect(memory_hub.url, auth={"token": token})
    reply = await sio.call("subscribe", {"event_types": TYPES, "filter": {"provider": []}})
    assert reply["error"]["code"] == "invalid_filter"
    await sio.close()
    refused = SioClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(memory_hub.url, auth={"token": token, "filter": "high"})
    assert (await refused.connect_error)["data"]["code"] == "invalid_filter"
