"""hub as a drop-in for KoreShield's proxy: the events it really publishes and the dashboard
client it really ships.

The shapes below are those of the proxy's source (koreshield/web, backend
``koreshield/src/koreshield/`` at 5e32857da3695cb594bede6a0334b7042e94da30):
``api/websocket.py`` ``publish_event()`` PUBLISHes
``json.dumps({"type", "timestamp": datetime.now(timezone.utc).isoformat(), "data"})`` on
``koreshield:events``; its callers are ``proxy.py`` (threats, start/stop status, the health
snapshot) and ``monitoring.py`` (its alert shape ``{rule_name, severity, message,
timestamp: time.time(), details}`` under several types). The dashboard client is
``src/lib/websocket-client.ts``, bundled unchanged (tests/js/proxy-client) and run in
Chromium with the ``ks_access_token`` cookie.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio

from hub import Publisher
from hub.errors import EventError
from hub.events import parse_timestamp
from tests.conftest import ROOT, RedisServer, RunningHub, make_settings, make_token, run_hub
from tests.helpers import (
    HEALTH,
    THREAT,
    close_code,
    connected,
    recv_json,
    send_json,
    wait_until,
    ws_connect,
)
from tests.sio_helpers import SioClient
from tests.test_legacy import hub_logs

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - scripts/test installs it
    pytest.fail("these tests need Playwright's Python package: pip install playwright",
                pytrace=False)

CHROMIUM = os.environ.get("HUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
CLIENT_DIR = ROOT / "tests" / "js" / "proxy-client"
ESBUILD = ROOT / "web-client" / "node_modules" / ".bin" / "esbuild"
in_browser = pytest.mark.asyncio(loop_scope="module")


# -- what the proxy publishes -----------------------------------------------------------
def _alert(rule_name: str, severity: str, message: str, details: dict[str, Any]
           ) -> dict[str, Any]:
    """monitoring.py's alert payload (notify_operational_event, _dispatch_operational_alert,
    the cost alerts of _monitoring_loop)."""
    return {"rule_name": rule_name, "severity": severity, "message": message,
            "timestamp": time.time(), "details": details}


def proxy_events() -> list[tuple[str, dict[str, Any]]]:
    """(type, data) for each shape the proxy's source sends."""
    return [
        # proxy.py, chat completions: the detector may give no confidence.
        ("threat_detected", {"request_id": "req_1", "endpoint": "/v1/chat/completions",
                             "attack_type": "prompt_injection", "confidence": None,
                             "severity": "high", "action_taken": "blocked", "user_id": "u_42"}),
        ("threat_detected", {"request_id": "req_2", "endpoint": "/v1/chat/completions",
                             "attack_type": "jailbreak", "confidence": 0.87,
                             "severity": "medium", "action_taken": "allowed", "user_id": None}),
        # proxy.py lifespan.
        ("system_status", {"status": "online", "version": "0.1.0"}),
        ("system_status", {"status": "shutdown"}),
        # monitoring.py start/stop and errors: the alert shape, no top-level status.
        ("system_status", _alert("monitoring_started", "info", "Monitoring system started",
                                 {"event_type": "system_status", "component": "monitoring",
                                  "status": "started"})),
        # monitoring.py cost alerts.
        ("cost_threshold_alert", _alert("daily_cost_budget", "warning",
                                        "Daily cost 81.20 exceeds budget 80.00",
                                        {"channels": ["slack"], "current": 81.2,
                                         "threshold": 80.0})),
        # monitoring.py notify_status_change → _dispatch_operational_alert.
        ("status_change_alert", _alert("provider_status_openai", "error",
                                       "Provider 'openai' changed from healthy to unhealthy",
                                       {"provider": "openai", "old_status": "healthy",
                                        "new_status": "unhealthy", "detail": None})),
        # proxy.py _background_heartbeat: ProviderService.get_health_snapshot().
        ("system_health_update", {
            "openai": {"enabled": True, "initialized": True, "healthy": True,
                       "status": "healthy", "response_time_ms": 182.4},
            "anthropic": {"enabled": True, "initialized": False, "healthy": True,
                          "status": "missing_credentials"},
            "gemini": {"enabled": False, "initialized": False, "healthy": False,
                       "status": "unhealthy", "error": "timeout"}}),
        # monitoring.py notify_operational_event's default type, and api/reports.py.
        ("operational_event", _alert("prompt_scan_completed", "warning",
                                     "Prompt scan blocked: threat detected",
                                     {"event_type": "operational_event", "request_id": "r9",
                                      "attack_type": "prompt_injection", "action": "blocked"})),
        ("operational_error", _alert("report_generation_failed", "error",
                                     "Report generation failed",
                                     {"event_type": "operational_error", "report_id": "7",
                                      "status": "failed", "error": "disk full",
                                      "user_id": "u_42"})),
        ("report_event", _alert("report_created", "info", "Report configuration created",
                                {"event_type": "report_event", "report_id": "7",
                                 "report_name": "weekly", "template": "security",
                                 "format": "pdf", "schedule": None, "user_id": "u_42"})),
        ("scan_event", _alert("prompt_scan_completed", "warning", "Prompt scan blocked: x",
                              {"event_type": "scan_event", "request_id": "r10"})),
    ]


NONCONFORMING = 2  # the threat without confidence and the monitoring system_status
PROXY_TYPES = sorted({type_ for type_, _ in proxy_events()})


def as_the_proxy_publishes(type_: str, data: dict[str, Any]) -> str:
    """api/websocket.py publish_event(), byte for byte."""
    return json.dumps({"type": type_, "timestamp": datetime.now(UTC).isoformat(), "data": data})


# -- clients of both transports ---------------------------------------------------------
class PlainWatcher:
    def __init__(self, ws: Any, hub_ids: set[str]) -> None:
        self.ws, self.hub_ids = ws, hub_ids

    async def next(self) -> dict[str, Any]:
        while True:
            message = await recv_json(self.ws, skip_status=False)
            # The instances' own announcements are not the proxy's.
            if message.get("data", {}).get("instance_id") not in self.hub_ids:
                return message


class SioWatcher:
    def __init__(self, client: SioClient, hub_ids: set[str]) -> None:
        self.client, self.hub_ids = client, hub_ids
        for name in PROXY_TYPES:
            if name not in client.client.handlers.get("/", {}):
                client.client.on(name, client._recorder(name))

    async def next(self) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(self.client.events.get(), 10)
            if message.get("data", {}).get("instance_id") not in self.hub_ids:
                return message


async def watchers(hubs: tuple[RunningHub, ...]) -> list[Any]:
    ids = {h.hub.settings.instance_id for h in hubs}
    result: list[Any] = []
    for hub in hubs:
        result.append(PlainWatcher(await connected(hub.ws_url, make_token()), ids))
        sio = SioClient()
        await sio.connect(hub.url, auth={"token": make_token()})
        result.append(SioWatcher(sio, ids))
    return result


async def close(watching: list[Any]) -> None:
    for watcher in watching:
        if isinstance(watcher, PlainWatcher):
            await watcher.ws.close()
        else:
            await watcher.client.close()


async def assert_received_unchanged(watcher: Any, sent: list[tuple[str, dict[str, Any]]]
                                    ) -> list[dict[str, Any]]:
    got = [await watcher.next() for _ in sent]
    # JSON in, JSON out: compare what a client decodes with what the proxy encoded.
    assert [[g["type"], g["data"]] for g in got] == json.loads(json.dumps(sent))
    return got


# -- the proxy's channel and Publisher, two instances, both transports ------------------
async def test_the_proxy_channel_delivers_every_shape_unchanged_to_both_transports(
        redis_hubs: tuple[RunningHub, RunningHub], redis_server: RedisServer) -> None:
    a, b = redis_hubs
    watching = await watchers((a, b))
    channel = a.hub.settings.legacy_channel
    raw = redis_server.client()
    await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 2,
                     what="both instances to subscribe to the legacy channel")
    before = await a.publish("provider_health_change", HEALTH)
    for watcher in watching:
        assert (await watcher.next())["id"] == before.id
    sent = proxy_events()
    bodies = [as_the_proxy_publishes(type_, data) for type_, data in sent]
    for body in bodies:
        raw.publish(channel, body)
    received = [await assert_received_unchanged(w, sent) for w in watching]
    ids = [e["id"] for e in received[0]]
    for other in received[1:]:
        assert [e["id"] for e in other] == ids  # the same events, once each
    for event, body in zip(received[0], bodies, strict=True):
        assert event["timestamp"] == parse_timestamp(json.loads(body)["timestamp"])
    def legacy(hub: RunningHub, result: str) -> float:
        return float(hub.hub.metrics.legacy.labels(result)._value.get())

    # Each instance reads every envelope, but the one that did not append an event may
    # still be reading the channel when the watchers have it: wait for both counts.
    await wait_until(lambda: all(legacy(h, "appended") + legacy(h, "duplicate") >= len(sent)
                                 for h in (a, b)),
                     what="both instances to count every envelope")
    for hub in (a, b):
        assert legacy(hub, "nonconforming") == NONCONFORMING
        assert legacy(hub, "invalid") == 0
    appended = sum(legacy(h, "appended") for h in (a, b))
    assert appended == len(sent)

    # Replays carry them too, on both transports.
    ws = await connected(b.ws_url, make_token())
    await send_json(ws, {"action": "subscribe", "event_types": PROXY_TYPES,
                         "last_event_id": before.id})
    update = await recv_json(ws, skip_status=False)
    assert update["type"] == "subscription_updated"
    assert update["data"]["subscribed_to"] == PROXY_TYPES
    assert "unknown_event_types" not in update["data"]  # every one of them is known now
    replay = PlainWatcher(ws, set())
    assert [e["id"] for e in await assert_received_unchanged(replay, sent)] == ids
    sio = SioClient()
    await sio.connect(a.url, auth={"token": make_token(), "last_event_id": before.id})
    replayed = await assert_received_unchanged(SioWatcher(sio, set()), sent)
    assert [e["id"] for e in replayed] == ids
    await ws.close()
    await sio.close()
    await close(watching)
    raw.close()


async def test_a_lenient_publisher_carries_every_shape_and_a_strict_one_refuses_them(
        redis_hubs: tuple[RunningHub, RunningHub], redis_server: RedisServer) -> None:
    a, b = redis_hubs
    watching = await watchers((a, b))
    sent = proxy_events()
    stream = a.hub.settings.stream_key
    async with Publisher(redis_server.url, stream_key=stream, lenient=True) as publisher:
        published = [await publisher.publish(type_, data) for type_, data in sent]
    for watcher in watching:
        got = await assert_received_unchanged(watcher, sent)
        assert [e["id"] for e in got] == [e.id for e in published]
    async with Publisher(redis_server.url, stream_key=stream) as strict:
        with pytest.raises(EventError) as unknown:
            await strict.publish("status_change_alert", sent[6][1])
        assert unknown.value.code == "unknown_event_type"
        with pytest.raises(EventError) as nonconforming:
            await strict.publish("threat_detected", sent[0][1])
        assert nonconforming.value.fields == ("data.confidence",)
    await close(watching)


async def test_post_events_stays_strict(redis_hubs: tuple[RunningHub, RunningHub]) -> None:
    import httpx

    a, _ = redis_hubs
    admin = {"Authorization": f"Bearer {make_token('ci', 'admin')}"}
    async with httpx.AsyncClient(base_url=a.url) as http:
        unknown = await http.post("/events", headers=admin,
                                  json={"type": "report_event", "data": {}})
        bad = await http.post("/events", headers=admin,
                              json={"type": "threat_detected", "data": {"severity": "dire"}})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_event_type"
    assert bad.status_code == 422
    assert bad.json()["error"]["fields"] == [
        "data.severity", "data.attack_type", "data.confidence", "data.action_taken"]


# -- subscribing the way the proxy's client does ----------------------------------------
@pytest.mark.parametrize("transport", ["websocket", "socketio"])
async def test_a_subscribe_with_unknown_names_keeps_the_known_ones(
        memory_hub: RunningHub, transport: str) -> None:
    names = ["threat_detected", "provider_health_change", "cost_threshold_alert",
             "system_status_update"]  # the proxy client's set (its own name for status)
    if transport == "websocket":
        ws = await connected(memory_hub.ws_url, make_token())
        await send_json(ws, {"action": "subscribe", "event_types": names})
        reply = (await recv_json(ws))["data"]
    else:
        sio = SioClient()
        await sio.connect(memory_hub.url, auth={"token": make_token()})
        reply = await sio.call("subscribe", {"event_types": names})
    assert reply == {"subscribed_to": sorted(names),
                     "unknown_event_types": ["system_status_update"]}
    await memory_hub.publish("system_status", {"status": "degraded"})  # filtered out
    threat = await memory_hub.publish("threat_detected", THREAT)
    if transport == "websocket":
        assert (await recv_json(ws, skip_status=False))["id"] == threat.id
        await ws.close()
    else:
        assert (await sio.next_event("threat_detected"))["id"] == threat.id
        assert sio.events.empty()
        await sio.close()


# -- the proxy's dashboard client in Chromium -------------------------------------------
@pytest.fixture(scope="module")
def client_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not ESBUILD.exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT / "web-client",
                       check=True, stdout=subprocess.DEVNULL)
    out = tmp_path_factory.mktemp("proxy-client") / "client.js"
    subprocess.run([str(ESBUILD), str(CLIENT_DIR / "entry.ts"), "--bundle", "--format=iife",
                    "--define:import.meta.env=globalThis.__KS_ENV", f"--outfile={out}",
                    "--log-level=warning"], check=True)
    return out.read_text()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - once per module, before any I/O
        pytest.fail(f"Chromium is required and missing at {CHROMIUM}: apt-get install chromium")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


class ProxyDashboard:
    """A page running the proxy's client against one hub; records what it logs and gets."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        page.on("console", lambda message: self.console.append(message.text))

    async def open(self, page_url: str, ws_base: str, bundle: str) -> None:
        await self.page.add_init_script(
            "globalThis.__KS_ENV = " + json.dumps(
                {"VITE_WS_BASE_URL": ws_base, "VITE_ENV": "development", "DEV": False})
            + "; globalThis.__seen = [];")
        await self.page.goto(page_url)
        await self.page.add_script_tag(content=bundle)
        await self.page.evaluate("""() => {
            for (const t of ['connection_established', 'subscription_updated', 'error',
                             'threat_detected', 'provider_health_change'])
                wsClient.on(t, (e) => globalThis.__seen.push(e));
        }""")

    async def seen(self, type_: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = await self.page.evaluate("globalThis.__seen")
        return [e for e in seen if e["type"] == type_]

    async def wait_seen(self, type_: str, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(await self.seen(type_)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the client did not get {count} {type_}")
            await asyncio.sleep(0.05)

    async def wait_console(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.console):
            if time.monotonic() > deadline:
                raise AssertionError(f"the client never logged {text!r}: {self.console[-8:]}")
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="module")
async def dashboard(browser: Browser) -> AsyncIterator[ProxyDashboard]:
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield ProxyDashboard(page)
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@in_browser
async def test_the_proxy_client_keeps_its_filter_across_a_restart(
        dashboard: ProxyDashboard, client_bundle: str) -> None:
    settings = make_settings()
    async with run_hub(settings) as hub:
        port = hub.port
        await dashboard.page.context.add_cookies([{
            "name": "ks_access_token", "value": make_token("dana"), "url": hub.url}])
        await dashboard.open(hub.url + "/ws/health", f"ws://127.0.0.1:{port}", client_bundle)
        # It connects as it loads (before a handler can see connection_established).
        await dashboard.page.wait_for_function("wsClient.isConnected()", timeout=30_000)
        await dashboard.page.evaluate(
            "wsClient.subscribe(['threat_detected', 'cost_threshold_alert', "
            "'system_status_update'])")
        await dashboard.wait_seen("subscription_updated", 1)
        update = (await dashboard.seen("subscription_updated"))[0]["data"]
        assert update["unknown_event_types"] == ["system_status_update"]
        await hub.publish("provider_health_change", HEALTH)
        first = await hub.publish("threat_detected", THREAT)
        await dashboard.wait_seen("threat_detected", 1)
    # A restart (a redeploy keeps the address): the client reconnects and subscribes again
    # with its whole set, unknown name included.
    async with run_hub(settings.replace(instance_id=settings.instance_id + "-2"),
                       port=port) as hub:
        await dashboard.wait_seen("subscription_updated", 2)
        await hub.publish("provider_health_change", HEALTH)
        second = await hub.publish("threat_detected", THREAT)
        await dashboard.wait_seen("threat_detected", 2)
    threats = await dashboard.seen("threat_detected")
    assert [e["id"] for e in threats] == [first.id, second.id]
    # Delivered in publish order: the health changes before the threats were filtered out.
    assert await dashboard.seen("provider_health_change") == []
    assert not await dashboard.seen("error")


@in_browser
@pytest.mark.parametrize("refusal", ["missing_token", "origin_not_allowed"])
async def test_the_proxy_client_backs_off_when_refused(
        dashboard: ProxyDashboard, client_bundle: str, refusal: str,
        caplog: pytest.LogCaptureFixture) -> None:
    async with run_hub(make_settings(refusal_limit=2)) as hub:
        # A foreign origin: the page is served from localhost, the hub is 127.0.0.1.
        page_url = (hub.url if refusal == "missing_token"
                    else f"http://localhost:{hub.port}") + "/ws/health"
        with hub_logs(caplog):
            await dashboard.open(page_url, f"ws://127.0.0.1:{hub.port}", client_bundle)
            # The first refusals (accept, close 4003) reset the client's backoff; the HTTP
            # 403 answers that follow do not, so its delay doubles.
            await dashboard.wait_console("Reconnecting in 4000ms (attempt 3/10)")
        refused = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("refused /ws/events connection")]
        assert len(refused) == 3, refused  # two 4003s, then one line for the 403s
        assert all(f"from 127.0.0.1: {refusal}" in line for line in refused)
        assert "HTTP 403 before the handshake" in refused[-1]
        assert hub.hub.metrics.auth_failures.labels(refusal)._value.get() >= 4


async def test_valid_tokens_from_a_refused_address_still_get_in(memory_hub: RunningHub) -> None:
    from websockets.exceptions import InvalidStatus

    limit = memory_hub.hub.settings.refusal_limit
    for _ in range(limit):  # the spec's refusal: accepted, then closed with 4003
        ws = await ws_connect(memory_hub.ws_url, "not-a-token")
        assert (await close_code(ws))[0] == 4003
    for _ in range(3):  # then answered before the handshake
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(memory_hub.ws_url, "not-a-token")
        assert refused.value.response.status_code == 403
    # Valid tokens from that same address are never affected.
    clients = [await connected(memory_hub.ws_url, make_token(f"user{n}")) for n in range(50)]
    for ws in clients:
        await ws.close()


async def test_socketio_refusals_are_logged_too(memory_hub: RunningHub,
                                               caplog: pytest.LogCaptureFixture) -> None:
    import socketio

    limit = memory_hub.hub.settings.refusal_limit
    with hub_logs(caplog):
        for _ in range(limit + 2):
            client = SioClient()
            with pytest.raises(socketio.exceptions.ConnectionError):
                await client.connect(memory_hub.url, auth={"token": "not-a-token"})
            assert (await client.connect_error)["data"]["code"] == 4003
    refused = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("refused Socket.IO connection from 127.0.0.1")]
    assert len(refused) == limit + 1  # then quiet for that address
    assert "not logging more from this address" in refused[-1]
    assert all("not-a-token" not in line for line in refused)


async def test_a_refusal_log_names_the_user_but_never_the_token(
        memory_hub: RunningHub, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token("erin")
    with hub_logs(caplog):
        ws = await ws_connect(memory_hub.ws_url, token,
                              additional_headers={"Origin": "https://evil.example"})
        assert (await close_code(ws))[0] == 4003
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert line == "refused /ws/events connection from 127.0.0.1: origin_not_allowed (user erin)"
    assert token not in caplog.text
