"""``GET /events``: the history over HTTP on both backends: the latest ``limit`` events,
paging forward with ``after``/``next_after``, types, filters and the tenant, truncation,
bounds and refusals."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from hub.events import id_key
from tests.conftest import RedisServer, RunningHub, make_settings, make_token, run_hub
from tests.helpers import COST, HEALTH, THREAT


async def get(hub: RunningHub, params: Any = None, token: str | None = None,
              headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"authorization": f"Bearer {token or make_token()}", **(headers or {})}
    async with httpx.AsyncClient() as http:
        return await http.get(f"{hub.url}/events", params=params, headers=sent)


async def test_latest_limit_events_oldest_first(any_hub: RunningHub) -> None:
    published = [await any_hub.publish("threat_detected", {**THREAT, "n": n})
                 for n in range(12)]
    body = (await get(any_hub, {"limit": 5})).json()
    assert [e["id"] for e in body["events"]] == [e.id for e in published[-5:]]
    assert body["events"][-1] == published[-1].envelope()
    assert body["truncated"] is False
    # The newest entry read: the last event, or on Redis a health marker (a stream entry,
    # never an event; one every 0.5 s) appended between the last publish and this GET.
    assert id_key(body["next_after"]) >= id_key(published[-1].id)
    if any_hub.hub.dispatcher.backend.name == "memory":
        assert body["next_after"] == published[-1].id
    assert body["first_retained_id"] is not None  # without after: the oldest retained
    # Polling from next_after gives only what came after.
    later = await any_hub.publish("threat_detected", THREAT)
    body = (await get(any_hub, {"after": body["next_after"]})).json()
    assert [e["id"] for e in body["events"]] == [later.id]
    # Default limit 100; the instance's own system_status "online" is the oldest.
    everything = (await get(any_hub)).json()["events"]
    assert [e["id"] for e in everything if e["type"] == "threat_detected"] == [
        e.id for e in [*published, later]]


async def test_pages_forward_from_after(any_hub: RunningHub) -> None:
    published = [await any_hub.publish("provider_health_change", {**HEALTH, "n": n})
                 for n in range(7)]
    seen: list[str] = []
    after = published[0].id
    while True:
        body = (await get(any_hub, {"after": after, "limit": 3,
                                    "types": "provider_health_change"})).json()
        seen += [e["id"] for e in body["events"]]
        after = body["next_after"]
        if not body["more"]:
            break
    assert seen == [e.id for e in published[1:]]
    assert body["truncated"] is False
    assert body["first_retained_id"] is None  # null unless truncated, on both backends


async def test_types_filters_and_tenant_apply(any_hub: RunningHub) -> None:
    await any_hub.publish("threat_detected", {**THREAT, "severity": "low"})
    crit = await any_hub.publish("threat_detected", {**THREAT, "severity": "critical"})
    await any_hub.publish("threat_detected", {**THREAT, "severity": "critical",
                                              "tenant_id": "other"})
    mine = await any_hub.publish("threat_detected", {**THREAT, "severity": "high",
                                                     "tenant_id": "acme"})
    await any_hub.publish("cost_threshold_alert", COST)
    err = await any_hub.publish("cost_threshold_alert", {**COST, "severity": "error"})
    await any_hub.publish("provider_health_change", HEALTH)
    acme = make_token(tenant_id="acme")
    body = (await get(any_hub, {"min_severity": "high",
                                "types": "threat_detected,cost_threshold_alert"},
                      token=acme)).json()
    # Untenanted events and the token's own tenant; never another tenant's.
    assert [e["id"] for e in body["events"]] == [crit.id, mine.id, err.id]
    body = (await get(any_hub, {"data.severity": "critical"})).json()
    assert [e["id"] for e in body["events"]] == [crit.id]  # an admin-less viewer: no tenant
    body = (await get(any_hub, {"data.provider": "openai,azure", "limit": 1})).json()
    assert [e["type"] for e in body["events"]] == ["provider_health_change"]


async def test_truncated_when_after_is_older_than_retention() -> None:
    async with run_hub(make_settings(history_size=5)) as running:
        first = await running.publish("threat_detected", THREAT)
        for _ in range(8):
            await running.publish("threat_detected", THREAT)
        body = (await get(running, {"after": first.id})).json()
        assert body["truncated"] is True
        assert body["first_retained_id"] == body["events"][0]["id"]
        assert len(body["events"]) == 5


async def test_truncated_on_redis(redis_server: RedisServer) -> None:
    async with run_hub(make_settings(redis_url=redis_server.url, history_size=5)) as running:
        first = await running.publish("threat_detected", THREAT)
        for _ in range(30):
            await running.publish("threat_detected", THREAT)
        body = (await get(running, {"after": first.id, "limit": 1000})).json()
        assert body["truncated"] is True and body["first_retained_id"] is not None
        assert len((await get(running, {"limit": 3})).json()["events"]) == 3


@pytest.mark.parametrize(("params", "code"), [
    ({"limit": "0"}, "invalid_parameter"), ({"limit": "1001"}, "invalid_parameter"),
    ({"limit": "ten"}, "invalid_parameter"), ({"after": "nope"}, "invalid_last_event_id"),
    ({"min_severity": "urgent"}, "invalid_filter"), ({"data.x": "a,"}, "invalid_filter"),
    ({"severity": "high"}, "invalid_parameter"), ({"types": ""}, "invalid_event_types"),
])
async def test_malformed_parameters_are_400(memory_hub: RunningHub, params: dict[str, str],
                                            code: str) -> None:
    response = await get(memory_hub, params)
    assert (response.status_code, response.json()["error"]["code"]) == (400, code)


async def test_auth_by_cookie_and_refusals(memory_hub: RunningHub) -> None:
    await memory_hub.publish("threat_detected", THREAT)
    async with httpx.AsyncClient() as http:
        ok = await http.get(f"{memory_hub.url}/events",
                            headers={"cookie": f"ks_access_token={make_token()}"})
        assert ok.status_code == 200 and ok.json()["events"]
        missing = await http.get(f"{memory_hub.url}/events")
        assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_token")
    foreign = await get(memory_hub, headers={"origin": "https://evil.example"})
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (403, "origin_not_allowed")
    assert (await get(memory_hub, {"limit": 1000})).status_code == 200
