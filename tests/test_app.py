"""The HTTP side and embedding: POST /events, /ws/health, /openapi.json, a FastAPI host."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from hub import create_app
from tests.conftest import RedisServer, RunningHub, make_settings, make_token, run_hub
from tests.helpers import THREAT, connected, recv_json
from tests.sio_helpers import SioClient

ADMIN = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}


async def post(hub: RunningHub, body: object, headers: dict[str, str] | None = None,
               content: bytes | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        if content is not None:
            return await http.post(f"{hub.url}/events", content=content,
                                   headers=ADMIN if headers is None else headers)
        return await http.post(f"{hub.url}/events", json=body,
                               headers=ADMIN if headers is None else headers)


async def test_publish_returns_202_with_the_id(any_hub: RunningHub) -> None:
    ws = await connected(any_hub.ws_url, make_token())
    response = await post(any_hub, {"type": "threat_detected", "data": THREAT})
    assert response.status_code == 202
    body = response.json()
    assert (await recv_json(ws))["id"] == body["id"]
    await ws.close()


@pytest.mark.parametrize(("body", "field", "code"), [
    ({"type": "nope", "data": {}}, "type", "unknown_event_type"),
    ({"data": THREAT}, "type", "invalid_event"),
    ({"type": "threat_detected"}, "data", "invalid_event"),
    ({"type": "threat_detected", "data": {**THREAT, "severity": "meh"}}, "data.severity",
     "invalid_event"),
    ({"type": "threat_detected", "data": {**THREAT, "confidence": 1.5}}, "data.confidence",
     "invalid_event"),
    ({"type": "threat_detected", "data": {**THREAT, "confidence": True}}, "data.confidence",
     "invalid_event"),
    ({"type": "provider_health_change", "data": {"provider": "x", "old_status": "healthy"}},
     "data.new_status", "invalid_event"),
    ({"type": "cost_threshold_alert", "data": {"severity": "warning"}}, "data.message",
     "invalid_event"),
    ({"type": "cost_threshold_alert", "data": {"severity": "info", "message": "m",
                                               "threshold": "ten"}}, "data.threshold",
     "invalid_event"),
    ({"type": "system_status", "data": {}}, "data.status", "invalid_event"),
    ({"type": "threat_detected", "data": {**THREAT, "pad": "x" * 66_000}}, "data",
     "event_too_large"),
    ([1, 2], "", "invalid_event"),
])
async def test_invalid_events_get_422_naming_the_field(memory_hub: RunningHub, body: object,
                                                       field: str, code: str) -> None:
    response = await post(memory_hub, body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code)


async def test_publish_auth_errors(memory_hub: RunningHub) -> None:
    assert (await post(memory_hub, {}, headers={})).status_code == 401
    forged = {"Authorization": "Bearer " + make_token(role="admin", secret="x" * 40)}
    response = await post(memory_hub, {"type": "threat_detected", "data": THREAT}, forged)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    viewer = {"Authorization": f"Bearer {make_token(role='viewer')}"}
    response = await post(memory_hub, {"type": "threat_detected", "data": THREAT}, viewer)
    assert response.status_code == 403
    cookie_only = {"Cookie": f"ks_access_token={make_token(role='admin')}"}
    response = await post(memory_hub, {"type": "threat_detected", "data": THREAT}, cookie_only)
    assert response.status_code == 401  # no cookie auth for a state-changing request
    response = await post(memory_hub, None, content=b"x" * 5_000_000)
    assert response.status_code == 413
    response = await post(memory_hub, None, content=b"{oops")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_publisher_roles_are_configurable() -> None:
    async with run_hub(make_settings(publisher_roles=("proxy",))) as running:
        proxy = {"Authorization": f"Bearer {make_token(role='proxy')}"}
        assert (await post(running, {"type": "threat_detected", "data": THREAT},
                           proxy)).status_code == 202
        assert (await post(running, {"type": "threat_detected", "data": THREAT})
                ).status_code == 403


async def test_health_reports_connections_by_transport(memory_hub: RunningHub) -> None:
    ws = await connected(memory_hub.ws_url, make_token())
    sio = SioClient()
    await sio.connect(memory_hub.url, auth={"token": make_token()})
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{memory_hub.url}/ws/health")).json()
    assert health["status"] == "healthy"
    assert health["active_connections"] == 2
    assert health["connections"] == {"websocket": 1, "socketio": 1, "sse": 0}
    assert health["redis_connected"] is False
    assert health["instance_id"] == memory_hub.hub.settings.instance_id
    assert health["version"]
    assert health["uptime_s"] >= 0
    await ws.close()
    await sio.close()


async def test_openapi_documents_http_endpoints_only(memory_hub: RunningHub) -> None:
    async with httpx.AsyncClient() as http:
        document = (await http.get(f"{memory_hub.url}/openapi.json")).json()
    validate(document)
    assert set(document["paths"]) == {"/events", "/events/stream", "/ws/health", "/metrics",
                                     "/admin/reload", "/admin/revocations", "/admin/connections",
                                     "/consumers"}
    assert set(document["paths"]["/events"]) == {"get", "post"}
    assert "/ws/events" not in document["paths"]
    assert "/socket.io/" not in document["paths"]


async def test_metrics_count_published_and_delivered(memory_hub: RunningHub) -> None:
    ws = await connected(memory_hub.ws_url, make_token())
    await memory_hub.publish("threat_detected", THREAT)
    await recv_json(ws)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{memory_hub.url}/metrics")).text
    assert 'hub_events_published_total{type="threat_detected"} 1.0' in text
    assert 'hub_events_delivered_total{type="threat_detected"} 1.0' in text
    assert 'hub_connections{transport="websocket"} 1.0' in text
    await ws.close()


async def test_two_apps_in_one_process_are_independent() -> None:
    async with run_hub(make_settings()) as a, run_hub(make_settings()) as b:
        ws_b = await connected(b.ws_url, make_token())
        await a.publish("threat_detected", THREAT)  # memory backends: separate worlds
        mine = await b.publish("cost_threshold_alert", {"severity": "info", "message": "b"})
        assert (await recv_json(ws_b))["id"] == mine.id
        await ws_b.close()


async def test_mounted_in_a_fastapi_host_that_owns_its_redis(redis_server: RedisServer) -> None:
    """The spec's set-up: the host app creates the Redis client and shares it with hub."""
    host_redis = aioredis.Redis.from_url(redis_server.url)
    hub_app = create_app(make_settings(), redis=host_redis)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with hub_app.lifespan_context_for_host():
            yield
        await host_redis.aclose()

    host = FastAPI(lifespan=lifespan)

    @host.get("/v1/status")
    async def status() -> dict[str, str]:
        return {"proxy": "ok"}

    @host.post("/v1/scan")
    async def scan() -> dict[str, str]:
        event = await hub_app.hub.publish("threat_detected", THREAT)
        return {"event_id": event.id}

    host.mount("/", hub_app)
    host.hub_app = hub_app  # type: ignore[attr-defined]

    async with run_hub(hub_app.hub.settings, app=host) as running:
        ws = await connected(running.ws_url, make_token())
        sio = SioClient()
        await sio.connect(running.url, auth={"token": make_token()})
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{running.url}/v1/status")).json() == {"proxy": "ok"}
            event_id = (await http.post(f"{running.url}/v1/scan")).json()["event_id"]
            health = (await http.get(f"{running.url}/ws/health")).json()
        assert (await recv_json(ws))["id"] == event_id
        assert (await sio.next_event())["id"] == event_id
        assert health["redis_connected"] is True
        await ws.close()
        await sio.close()


@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["type", "data", "timestamp", "x"]),
                    st.one_of(st.none(), st.text(max_size=30), st.integers(-(2**53), 2**53),
                              st.dictionaries(st.text(max_size=12),
                                              st.one_of(st.none(), st.floats(allow_nan=False),
                                                        st.text(max_size=12)), max_size=5)),
                    max_size=4).map(lambda d: orjson.dumps(d)),
))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
async def test_fuzzed_publishes_get_a_clear_answer(memory_hub: RunningHub, body: bytes) -> None:
    response = await post(memory_hub, None, content=body)
    assert response.status_code in (202, 400, 422), response.text
    if response.status_code != 202:
        error = response.json()["error"]
        assert error["code"] and error["message"]
