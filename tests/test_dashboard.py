"""The browser dashboard (hub/static/dashboard, built from web-client/): shipped files are
fresh, and it works end to end in headless Chromium against real hub servers.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright's Python package;
a missing browser fails these tests (CI installs it) rather than skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - CI installs it
    pytest.fail("the dashboard tests need Playwright's Python package: pip install playwright "
                "(the browser is Debian's chromium, not a Playwright download)", pytrace=False)

from hub import Publisher
from tests.conftest import (
    ROOT,
    RedisServer,
    RunningHub,
    free_port,
    make_settings,
    make_token,
    run_hub,
)
from tests.helpers import COST, HEALTH, THREAT, wait_until

CHROMIUM = os.environ.get("HUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WEB_CLIENT = ROOT / "web-client"
SHIPPED = ROOT / "hub" / "static" / "dashboard"
SCREENSHOTS = ROOT / "docs"  # dashboard-1280.png, dashboard-420.png (HUB_UPDATE_SCREENSHOTS=1)
# Reconnecting after a restart takes socket.io-client's backoff (at most 5 s) plus start-up.
RECONNECT_TIMEOUT_MS = 30_000

# The browser tests share one Chromium, so they run in the module's event loop.
in_browser = pytest.mark.asyncio(loop_scope="module")
expect.set_options(timeout=20_000)  # what must show, on a loaded machine too


# -- the shipped files ------------------------------------------------------------------
def _inputs_hash() -> str:
    """web-client/build.mjs's inputsHash(), in Python."""
    info = json.loads((SHIPPED / "build-info.json").read_text())
    sources = sorted(p.name for p in (WEB_CLIENT / "src").iterdir())
    files = ["build.mjs", "package.json", "package-lock.json", *(f"src/{n}" for n in sources)]
    assert files == info["inputs"], "web-client inputs changed: run `npm run build` in web-client/"
    digest = hashlib.sha256()
    for name in files:
        text = (WEB_CLIENT / name).read_text(encoding="utf-8").replace("\r\n", "\n")
        digest.update(f"{name}\0{text}\0".encode())
    return digest.hexdigest()


def test_shipped_dashboard_matches_its_sources() -> None:
    info = json.loads((SHIPPED / "build-info.json").read_text())
    assert _inputs_hash() == info["inputs_sha256"], (
        "hub/static/dashboard is stale: web-client/ changed since the last build; "
        "run `npm ci && npm run build` in web-client/ and commit the result")
    for name, expected in info["outputs"].items():
        actual = hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest()
        assert actual == expected, (
            f"hub/static/dashboard/{name} was edited by hand; edit web-client/src and rebuild")


def test_rebuilding_reproduces_the_shipped_files(tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are required to rebuild the dashboard (install Node 20)")
    if not (WEB_CLIENT / "node_modules" / "esbuild").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB_CLIENT, check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run(["node", "build.mjs", "--outdir", str(tmp_path)], cwd=WEB_CLIENT,
                   check=True, stdout=subprocess.DEVNULL)
    for name in ("index.html", "app.js", "app.css", "build-info.json"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), (
            f"hub/static/dashboard/{name} is stale: run `npm run build` in web-client/")


async def test_dashboard_is_served_from_the_package(memory_hub: RunningHub) -> None:
    async with httpx.AsyncClient(base_url=memory_hub.url) as client:
        page = await client.get("/dashboard/")
        script = await client.get("/dashboard/app.js")
    assert page.status_code == 200
    assert 'src="app.js"' in page.text
    assert script.status_code == 200
    assert "socket.io" in script.text  # the client is bundled: no CDN


# -- browser fixtures -------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - once per module, before any I/O
        pytest.fail(f"Chromium is required for the dashboard tests and is missing at {CHROMIUM}:"
                    " install it with `apt-get install -y chromium` (or set HUB_CHROMIUM)")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


async def sign_in(page: Page, hub: RunningHub, token: str) -> None:
    await page.goto(hub.url + "/dashboard/")
    await page.fill("#token-input", token)
    await page.click("#signin-button")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")


async def post_event(hub: RunningHub, type_: str, data: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=hub.url) as client:
        admin = make_token("ci", "admin")
        response = await client.post("/events", json={"type": type_, "data": data},
                                     headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def row(page: Page, event_id: str) -> Any:
    return page.locator(f'#feed li[data-id="{event_id}"]')


# -- end to end -------------------------------------------------------------------------
@in_browser
async def test_sign_in_and_see_a_published_event(page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        await sign_in(page, hub, make_token("alice", "viewer"))
        await expect(page.locator("#who")).to_have_text("alice (viewer)")
        await expect(page.locator("#instance")).to_have_text(
            f"via {hub.hub.settings.instance_id}")
        event_id = await post_event(hub, "threat_detected", THREAT)
        published = row(page, event_id)
        await expect(published).to_be_visible()
        await expect(published.locator(".badge")).to_have_text("high")
        await expect(published.locator(".sum")).to_contain_text("prompt_injection")
        await published.locator("summary").click()  # expand: the full envelope as JSON
        await expect(published.locator("pre")).to_contain_text(f'"id": "{event_id}"')
        await expect(page.locator('#counters li[data-type="threat_detected"] .n')).to_have_text("1")
        # A viewer may not publish: the form stays hidden.
        await expect(page.locator("#publish")).to_be_hidden()


@in_browser
async def test_type_filter_changes_the_subscription(page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        await sign_in(page, hub, make_token())
        threat1 = await post_event(hub, "threat_detected", THREAT)
        health1 = await post_event(hub, "provider_health_change", HEALTH)
        await expect(row(page, health1)).to_be_visible()

        await page.uncheck('#filters input[data-type="threat_detected"]')
        await expect(row(page, threat1)).to_be_hidden()
        await expect(row(page, health1)).to_be_visible()
        await subscribed(page, "cost_threshold_alert,provider_health_change,system_status")
        threat2 = await post_event(hub, "threat_detected", THREAT)
        health2 = await post_event(hub, "provider_health_change", HEALTH)
        await expect(row(page, health2)).to_be_visible()
        # Delivery is in publish order, so threat2 would be here by now had it been sent.
        await expect(row(page, threat2)).to_have_count(0)

        await page.check('#filters input[data-type="threat_detected"]')
        await expect(row(page, threat1)).to_be_visible()
        await subscribed(page, "cost_threshold_alert,provider_health_change,system_status,"
                               "threat_detected")
        threat3 = await post_event(hub, "threat_detected", THREAT)
        await expect(row(page, threat3)).to_be_visible()

        for type_ in ("threat_detected", "provider_health_change", "cost_threshold_alert",
                      "system_status"):
            await page.uncheck(f'#filters input[data-type="{type_}"]')
        await subscribed(page, "")
        await expect(page.locator("#feed li")).to_have_count(0)
        await expect(page.locator("#feed-note")).to_have_text("No event types selected.")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")


async def subscribed(page: Page, types: str) -> None:
    """Wait for the hub's acknowledgement of the page's filter change."""
    await expect(page.locator("#filters")).to_have_attribute("data-subscribed", types)


@in_browser
async def test_bad_token_shows_a_sign_in_error(page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        await page.goto(hub.url + "/dashboard/")
        await page.fill("#token-input", "not-a-token")
        await page.click("#signin-button")
        error = page.locator("#signin-error")
        await expect(error).to_be_visible()
        await expect(error).to_contain_text("Sign-in failed: the hub refused this token")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "offline")
        assert await page.evaluate("sessionStorage.length") == 0  # nothing kept

        await page.fill("#token-input", make_token("alice", ttl=-60))
        await page.click("#signin-button")
        await expect(error).to_contain_text("expired")


@in_browser
async def test_cookie_sign_in(page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        await page.context.add_cookies([{
            "name": "ks_access_token", "value": "Bearer%20" + make_token("carol"),
            "url": hub.url,
        }])
        earlier = await post_event(hub, "provider_health_change", HEALTH)
        await page.goto(hub.url + "/dashboard/")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        await expect(page.locator("#who")).to_have_text("carol (viewer)")
        await expect(row(page, earlier)).to_be_visible()  # GET /events, by the cookie too
        event_id = await post_event(hub, "cost_threshold_alert", COST)
        await expect(row(page, event_id)).to_be_visible()
        await expect(page.locator("#costs")).to_contain_text("daily budget at 80%")


@in_browser
async def test_dashboard_stays_connected_across_three_token_lifetimes(page: Page) -> None:
    """Short-lived tokens in a cookie that something keeps renewing: the page refreshes
    in-band on each token_expiring and keeps its one connection (issue 15)."""
    import asyncio
    import time

    # The notice comes 0.5-1.5 s into each token (exp is whole seconds) and leaves 3.5 s to
    # refresh: room for a stalled browser or event loop, which a 1 s window was not.
    ttl = 5
    async with run_hub(make_settings(token_expiring_lead_s=3.5)) as hub:
        async def renew() -> None:
            await page.context.add_cookies([{
                "name": "ks_access_token", "value": make_token("carol", ttl=ttl),
                "url": hub.url}])

        async def sidecar() -> None:  # the sign-in service renewing the cookie
            while True:
                await asyncio.sleep(0.2)
                await renew()

        await renew()
        keeper = asyncio.create_task(sidecar())
        try:
            await page.goto(hub.url + "/dashboard/")
            conn = page.locator("#conn")
            await expect(conn).to_have_attribute("data-state", "connected")
            sids = set(hub.hub.socketio.connections)
            started = time.time()
            # At least four: the counter moves on every second or so, faster than a loaded
            # machine may poll for one exact value.
            await page.wait_for_function(
                "() => Number(document.querySelector('#conn').dataset.refreshes || 0) >= 4",
                timeout=(4 + 2) * ttl * 1000)
            # Past three lifetimes of the first token (the clock: nothing to await).
            await asyncio.sleep(max(0.0, started + 3 * ttl - time.time()))
            await expect(conn).to_have_attribute("data-state", "connected")
            assert set(hub.hub.socketio.connections) == sids  # the same connection
            event_id = await post_event(hub, "cost_threshold_alert", COST)
            await expect(row(page, event_id)).to_be_visible()
        finally:
            keeper.cancel()


@in_browser
async def test_pause_holds_rows_until_resumed(page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        await sign_in(page, hub, make_token())
        await page.click("#pause")
        held = await post_event(hub, "provider_health_change", HEALTH)
        await expect(page.locator("#pause")).to_have_text("Resume (1 new)")
        await expect(row(page, held)).to_have_count(0)
        # Counters and the health grid keep updating while the feed is paused.
        tile = page.locator('#providers [data-provider="openai"]')
        await expect(tile).to_contain_text("degraded")
        await page.click("#pause")
        await expect(row(page, held)).to_be_visible()


@in_browser
async def test_reconnects_after_a_restart_and_catches_up(page: Page,
                                                         redis_server: RedisServer) -> None:
    port = free_port()
    first = make_settings(redis_url=redis_server.url)
    second = first.replace(instance_id=first.instance_id + "-restarted")
    async with run_hub(first, port=port) as hub:
        await sign_in(page, hub, make_token())
        await expect(page.locator("#instance")).to_have_text(f"via {first.instance_id}")
        # Only threats, so the catch-up count is exactly what this test publishes.
        for other in ("provider_health_change", "cost_threshold_alert", "system_status"):
            await page.uncheck(f'#filters input[data-type="{other}"]')
        await subscribed(page, "threat_detected")
        before = await post_event(hub, "threat_detected", THREAT)
        await expect(row(page, before)).to_be_visible()

    await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    async with Publisher(redis_server.url, stream_key=first.stream_key) as publisher:
        missed = [(await publisher.publish("threat_detected", {**THREAT, "n": i})).id
                  for i in range(3)]

    async with run_hub(second, port=port):
        conn = page.locator("#conn")
        await expect(conn).to_have_attribute("data-state", "connected",
                                             timeout=RECONNECT_TIMEOUT_MS)
        for event_id in missed:
            await expect(row(page, event_id)).to_be_visible()
        await expect(page.locator(".banner[data-key=resumed]")).to_contain_text(
            "caught up 3 events")
        await expect(page.locator("#instance")).to_have_text(f"via {second.instance_id}")
        await expect(page.locator('#feed li[data-type="threat_detected"]')).to_have_count(4)


@in_browser
async def test_publish_form(page: Page) -> None:
    """An admin sends a test event from the form."""
    async with run_hub(make_settings(instance_id="hub-1")) as hub:
        await sign_in(page, hub, make_token("ops", "admin"))
        await expect(page.locator("#publish")).to_be_visible()
        await page.click("#publish-send")  # the form's default: a high prompt_injection
        result = page.locator("#publish-result")
        await expect(result).to_contain_text("Published ")
        sent_id = (await result.text_content() or "").removeprefix("Published ").strip()
        await expect(row(page, sent_id)).to_be_visible()
        await expect(row(page, sent_id).locator(".sum")).to_have_text(
            "prompt_injection · blocked (92%)")


# -- security headers (issue 10) --------------------------------------------------------
async def test_dashboard_sends_security_headers_and_a_relative_redirect(
        memory_hub: RunningHub) -> None:
    async with httpx.AsyncClient(base_url=memory_hub.url) as client:
        page = await client.get("/dashboard/")
        script = await client.get("/dashboard/app.js")
        redirect = await client.get("/dashboard", headers={"Host": "evil.example"})
    for response in (page, script):
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert redirect.status_code in (301, 302, 307, 308)
    assert redirect.headers["location"] == "/dashboard/"  # a path, not built from Host


CSP_RECORDER = ("document.addEventListener('securitypolicyviolation', e => "
                "(window.__csp = window.__csp || [])"
                ".push(e.violatedDirective + ' ' + e.blockedURI))")


@in_browser
async def test_dashboard_works_under_its_csp_and_keeps_the_token_in_memory(page: Page) -> None:
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    async with run_hub(make_settings()) as hub:
        await page.add_init_script(CSP_RECORDER)
        token = make_token("alice", "viewer")
        await sign_in(page, hub, token)
        event_id = await post_event(hub, "threat_detected", THREAT)
        await expect(row(page, event_id)).to_be_visible()
        await page.uncheck('#filters input[data-type="threat_detected"]')
        await expect(row(page, event_id)).to_be_hidden()  # filtering without inline styles
        await page.check('#filters input[data-type="threat_detected"]')
        await expect(row(page, event_id)).to_be_visible()
        assert await page.evaluate("window.__csp || []") == []
        assert violations == []
        stored = await page.evaluate(
            "JSON.stringify(Object.assign({}, sessionStorage, localStorage))")
        assert token not in stored and stored == "{}"


# -- the analyst's dashboard (issue 14, part 5) -----------------------------------------
@contextlib.asynccontextmanager
async def new_page(browser: Browser, **options: Any) -> AsyncIterator[Page]:
    """A page in a context of its own (time zone, permissions…), failing on page errors."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860}, **options)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


async def feed_ids(page: Page) -> list[str]:
    ids: list[str] = await page.eval_on_selector_all(
        "#feed li", "rows => rows.map(r => r.dataset.id)")
    return ids


def id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def format_in_node(envelopes: list[Any], tz: str = "UTC",
                   now: str = "2025-01-15T12:00:00Z") -> list[dict[str, Any]]:
    """web-client/src/format.js run by Node over ``envelopes`` (tests/js/dashboard_format.mjs)."""
    if shutil.which("node") is None:
        pytest.fail("node is required for the dashboard's formatting tests (install Node 20)")
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "js" / "dashboard_format.mjs")],
        input=json.dumps(envelopes), capture_output=True, text=True, check=True,
        env={**os.environ, "TZ": tz, "HUB_NOW": now})
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def test_rows_read_every_shape_the_proxy_sends_and_survive_broken_data() -> None:
    from tests.test_proxy_compat import proxy_events

    real: list[dict[str, Any]] = [
        {"id": f"1736937000123-{i}", "type": type_, "timestamp": "2025-01-15T10:30:00.123Z",
         "data": data} for i, (type_, data) in enumerate(proxy_events())]
    got = {(e["type"], r["summary"]) for e, r in zip(real, format_in_node(real), strict=True)}
    for expected in [
        ("threat_detected", "prompt_injection · blocked"),  # confidence: null
        ("system_status", "online · version 0.1.0"),
        ("system_status", "Monitoring system started · component monitoring"
                          " · rule monitoring_started"),
        ("cost_threshold_alert", "Daily cost 81.20 exceeds budget 80.00 · 81.2 / 80"
                                 " · rule daily_cost_budget"),
        ("status_change_alert", "Provider 'openai' changed from healthy to unhealthy"
                                " · rule provider_status_openai"),
        ("system_health_update", "2/2 healthy · openai healthy 182 ms"
                                 " · anthropic missing credentials · gemini unhealthy (off)"),
        ("operational_event", "Prompt scan blocked: threat detected · request id r9"
                              " · rule prompt_scan_completed"),
        ("operational_error", "Report generation failed · error: disk full · report id 7"
                              " · rule report_generation_failed"),
        ("report_event", "Report configuration created · report name weekly"
                         " · rule report_created"),
    ]:
        assert expected in got

    # Every field of every shape missing, null, or of another JSON type; data itself not
    # an object; no id or type: a row reads something, and nothing throws.
    broken: list[Any] = [None, {}, {"type": 5}, {"type": "x", "data": None},
                         {"type": "threat_detected", "data": [1, 2]},
                         {"type": "system_health_update", "data": {"openai": "up", "x": None}},
                         {"type": "status_change_alert", "data": {"details": "oops"}}]
    for envelope in real:
        for key in envelope["data"]:
            for value in (None, 12, True, {"a": {"b": 1}}, [1, "x"], "<b>x</b>" * 100):
                broken.append({**envelope, "data": {**envelope["data"], key: value}})
            broken.append({**envelope, "data": {k: v for k, v in envelope["data"].items()
                                                if k != key}})
    results = format_in_node(broken)
    assert [r for r in results if "error" in r] == []
    for result in results:
        assert isinstance(result["summary"], str) and 0 < len(result["summary"]) <= 300
    assert results[0]["summary"] == "—"


def test_times_show_their_zone_and_date_with_utc_on_hover() -> None:
    envelope = {"id": "1-0", "type": "system_status", "timestamp": "2025-01-15T10:30:00.123Z",
                "data": {"status": "online"}}
    today, = format_in_node([envelope], tz="America/New_York", now="2025-01-15T18:00:00Z")
    assert today["time"] == {"time": "05:30:00 EST", "date": "",
                             "utc": "2025-01-15T10:30:00.123Z"}
    later, = format_in_node([envelope], tz="Asia/Tokyo", now="2025-02-01T00:00:00Z")
    assert later["time"]["time"] == "19:30:00 GMT+9" and later["time"]["date"] == "Jan 15"


async def read_download(info: Any) -> str:
    download = await info.value
    return await asyncio.to_thread(Path(await download.path()).read_text)


async def publish_all(hub: RunningHub, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [(await hub.publish(type_, data)).id for type_, data in events]


@in_browser
async def test_opens_with_history_then_live_events_none_missed_or_twice(page: Page) -> None:
    """Events published before sign-in show first (GET /events); events published while
    the page loads and connects are neither lost nor doubled at the seam."""
    async with run_hub(make_settings()) as hub:
        before = await publish_all(hub, [("threat_detected", THREAT), ("provider_health_change",
                                          HEALTH), ("cost_threshold_alert", COST)])
        published: list[str] = []
        signed_in = asyncio.Event()

        async def producer() -> None:  # keeps publishing across the history/live seam
            while not signed_in.is_set():
                published.append((await hub.publish("threat_detected", THREAT)).id)
                await asyncio.sleep(0.005)  # pacing the load, not synchronising

        task = asyncio.create_task(producer())
        try:
            await sign_in(page, hub, make_token())
        finally:
            signed_in.set()
            await task
        last = await post_event(hub, "threat_detected", {**THREAT, "attack_type": "last"})
        await expect(row(page, last)).to_be_visible()
        ids = await feed_ids(page)
        assert len(ids) == len(set(ids)), "an event shows twice"
        assert set(before + published + [last]) <= set(ids), "an event is missing"
        assert ids == sorted(ids, key=id_key, reverse=True)  # newest on top, history below
        assert len(published) > 5  # the producer really ran across the seam
        # History events do not count as news: no banner about resuming.
        await expect(page.locator(".banner[data-key=resumed]")).to_have_count(0)


@in_browser
async def test_minimum_severity_is_applied_by_the_hub(page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        low, medium, high, critical, warning, cost_critical, health = await publish_all(hub, [
            ("threat_detected", {**THREAT, "severity": "low"}),
            ("threat_detected", {**THREAT, "severity": "medium"}),
            ("threat_detected", {**THREAT, "severity": "high"}),
            ("threat_detected", {**THREAT, "severity": "critical"}),
            ("cost_threshold_alert", COST),
            ("cost_threshold_alert", {**COST, "severity": "critical"}),
            ("provider_health_change", HEALTH)])
        await sign_in(page, hub, make_token())
        for event_id in (low, medium, high, critical, warning, cost_critical, health):
            await expect(row(page, event_id)).to_be_visible()

        history: list[str] = []
        page.on("request", lambda r: history.append(r.url) if "/events?" in r.url else None)
        await page.select_option("#min-severity", "high")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        await expect(row(page, critical)).to_be_visible()
        for gone in (low, medium, warning):
            await expect(row(page, gone)).to_have_count(0)
        for kept in (high, cost_critical, health):  # types without an order are not narrowed
            await expect(row(page, kept)).to_be_visible()
        assert any("min_severity=high" in url for url in history)
        # The live connection carries the filter on the hub's side.
        await wait_until(lambda: [c.filter.describe() if c.filter else None
                                  for c in hub.hub.socketio.connections.values()]
                         == [{"min_severity": "high"}], timeout=30,
                         what="the hub applying the filter")
        live_low = await post_event(hub, "threat_detected", {**THREAT, "severity": "low"})
        live_high = await post_event(hub, "threat_detected", THREAT)
        await expect(row(page, live_high)).to_be_visible()
        await expect(row(page, live_low)).to_have_count(0)  # delivered in order: never sent

        await page.select_option("#min-severity", "")
        await expect(row(page, live_low)).to_be_visible()  # back, from the history
        await wait_until(lambda: [c.filter for c in hub.hub.socketio.connections.values()]
                         == [None], timeout=30, what="the filter lifted")


@in_browser
async def test_search_narrows_the_loaded_rows_and_export_gives_them_as_ndjson(
        page: Page) -> None:
    async with run_hub(make_settings()) as hub:
        jailbreak, _pii, _health = await publish_all(hub, [
            ("threat_detected", {**THREAT, "attack_type": "jailbreak", "provider": "azure"}),
            ("threat_detected", {**THREAT, "attack_type": "pii_leak"}),
            ("provider_health_change", HEALTH)])
        token = make_token()
        await page.add_init_script(CSP_RECORDER)
        await sign_in(page, hub, token)
        await expect(row(page, jailbreak)).to_be_visible()

        await page.fill("#search", "AZURE")  # case-insensitive, over data values too
        await expect(page.locator("#feed li:visible")).to_have_count(1)
        await expect(page.locator("#search")).to_have_attribute("data-matches", "1")
        async with page.expect_download() as download:
            await page.click("#export")
        lines = (await read_download(download)).splitlines()
        async with httpx.AsyncClient(base_url=hub.url) as client:
            stored = (await client.get("/events", headers={
                "Authorization": f"Bearer {token}"})).json()["events"]
        by_id = {e["id"]: e for e in stored}
        assert [json.loads(line) for line in lines] == [by_id[jailbreak]]
        assert (await download.value).suggested_filename.startswith("hub-events-")

        await page.fill("#search", "")
        await expect(page.locator("#feed li:visible")).to_have_count(len(stored))
        async with page.expect_download() as download:
            await page.click("#export")
        exported = [json.loads(line) for line in (await read_download(download)).splitlines()]
        assert exported == stored  # every row shown, oldest first, the envelopes unchanged
        assert await page.evaluate("window.__csp || []") == []  # the download, under the CSP


@in_browser
async def test_threat_rows_show_provider_endpoint_tenant_and_zoned_time(
        browser: Browser) -> None:
    from zoneinfo import ZoneInfo

    async with run_hub(make_settings()) as hub, \
            new_page(browser, timezone_id="America/New_York", locale="en-US") as page:
        await sign_in(page, hub, make_token("alice", "viewer", tenant_id="acme"))
        hostile = "<img src=x onerror=\"document.title='owned'\">"
        full = await post_event(hub, "threat_detected", {
            **THREAT, "attack_type": hostile, "provider": "openai",
            "endpoint": "/v1/chat/completions", "tenant_id": "acme"})
        bare = await post_event(hub, "threat_detected", THREAT)
        await expect(row(page, bare)).to_be_visible()
        meta = row(page, full).locator(".meta")
        await expect(meta.locator(".kv-provider .v")).to_have_text("openai")
        await expect(meta.locator(".kv-endpoint .v")).to_have_text("/v1/chat/completions")
        await expect(meta.locator(".kv-tenant .v")).to_have_text("acme")
        await expect(row(page, bare).locator(".meta")).to_have_count(0)
        # Event text is text: shown as written, never parsed as HTML.
        await expect(row(page, full).locator(".sum")).to_contain_text(hostile)
        assert await page.locator("#feed img").count() == 0
        assert await page.title() != "owned"

        time = row(page, full).locator("time")
        stamp = await time.get_attribute("datetime") or ""
        local = datetime.fromisoformat(stamp).astimezone(ZoneInfo("America/New_York"))
        await expect(time.locator(".clock")).to_have_text(local.strftime("%H:%M:%S %Z"))
        await expect(time).to_have_attribute("title", f"UTC {stamp}")


ALERT_RECORDER = """
(() => {
  window.__notes = []; window.__asked = 0; window.__tones = 0;
  const Real = window.Notification;
  class Recorded extends Real {
    constructor(title, options) {
      super(title, options);
      window.__notes.push({title, body: options?.body});
    }
  }
  Recorded.requestPermission = (...a) => { window.__asked++; return Real.requestPermission(...a); };
  Object.defineProperty(Recorded, "permission", { get: () => Real.permission });
  window.Notification = Recorded;
  const start = OscillatorNode.prototype.start;
  OscillatorNode.prototype.start = function (...a) {
    window.__tones++;
    return start.apply(this, a);
  };
})();
"""


@in_browser
async def test_critical_events_notify_and_sound_only_once_turned_on(browser: Browser) -> None:
    critical = {**THREAT, "severity": "critical", "attack_type": "jailbreak"}
    async with run_hub(make_settings()) as hub:
        # Not granted: nothing is asked at load; turning it on asks, and a refusal says so.
        async with new_page(browser) as page:
            await page.add_init_script(ALERT_RECORDER)
            await sign_in(page, hub, make_token())
            assert await page.evaluate("window.__asked") == 0
            await page.click("#notify")
            await expect(page.locator(".banner[data-key=alerts]")).to_contain_text("blocked")
            await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "false")
            assert await page.evaluate("window.__asked") == 1

        async with new_page(browser) as page:
            await page.context.grant_permissions(["notifications"], origin=hub.url)
            await page.add_init_script(ALERT_RECORDER)
            await page.add_init_script(CSP_RECORDER)
            await hub.publish("threat_detected", critical)  # history: old news, no alert
            await sign_in(page, hub, make_token())
            off = await post_event(hub, "threat_detected", critical)
            await expect(row(page, off)).to_be_visible()

            await page.click("#notify")
            await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "true")
            await page.click("#sound")
            await expect(page.locator("#sound")).to_have_attribute("aria-pressed", "true")
            await page.wait_for_function("() => window.__tones === 2")  # the sample tone
            high = await post_event(hub, "threat_detected", THREAT)
            await expect(row(page, high)).to_be_visible()
            on = await post_event(hub, "threat_detected", {**critical, "provider": "azure"})
            await expect(row(page, on)).to_be_visible()
            await page.wait_for_function(
                "() => window.__notes.length === 1 && window.__tones === 4")
            note = (await page.evaluate("window.__notes"))[0]
            assert note["title"] == "Critical threat detected"
            assert "jailbreak" in note["body"] and "provider azure" in note["body"]

            await page.click("#notify")  # off again; the sound stays on
            await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "false")
            await post_event(hub, "threat_detected", critical)
            await page.wait_for_function("() => window.__tones === 6")  # the alert ran…
            assert len(await page.evaluate("window.__notes")) == 1  # …without a notification
            assert await page.evaluate("window.__csp || []") == []

            # The choices outlive a reload; the critical events of the history raise nothing,
            # the next live one does.
            await page.click("#notify")
            await page.reload()
            await sign_in(page, hub, make_token())
            await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "true")
            await expect(page.locator("#sound")).to_have_attribute("aria-pressed", "true")
            await expect(row(page, on)).to_be_visible()
            await post_event(hub, "threat_detected", {**critical, "attack_type": "after_reload"})
            await page.wait_for_function(
                "() => window.__notes.length === 1 && window.__notes[0].body.includes('after_')")


@in_browser
async def test_the_proxys_other_event_types_read_as_one_line(page: Page,
                                                            redis_server: RedisServer) -> None:
    from tests.test_proxy_compat import proxy_events

    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as hub:
        async with Publisher(redis_server.url, stream_key=settings.stream_key,
                             lenient=True) as publisher:
            ids = {type_: (await publisher.publish(type_, data)).id
                   for type_, data in proxy_events()}
            broken = (await publisher.publish("operational_event",
                                              {"message": None, "details": "oops"})).id
        await sign_in(page, hub, make_token())
        expected = {
            "status_change_alert": "Provider 'openai' changed from healthy to unhealthy",
            "system_health_update": "2/2 healthy · openai healthy 182 ms",
            "operational_event": "Prompt scan blocked: threat detected",
            "operational_error": "Report generation failed · error: disk full",
            "report_event": "Report configuration created",
            "scan_event": "Prompt scan blocked: x",
            "cost_threshold_alert": "Daily cost 81.20 exceeds budget 80.00 · 81.2 / 80",
            "system_status": "Monitoring system started",
        }
        for type_, text in expected.items():
            await expect(row(page, ids[type_]).locator(".sum")).to_contain_text(text)
        await expect(row(page, ids["operational_error"]).locator(".badge")).to_have_text("error")
        await expect(row(page, broken).locator(".sum")).to_have_text("details oops")
        # The proxy's types become filters of their own.
        await expect(page.locator('#filters input[data-type="status_change_alert"]')
                     ).to_be_checked()


LAYOUT_CHECK = """
() => {
  const scroller = document.scrollingElement;
  const overlaps = [];
  const visible = (el) => el.getClientRects().length > 0 && el.textContent.trim() !== "";
  const cut = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > 0.5
    && Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 0.5;
  for (const badge of document.querySelectorAll(".badge")) {
    if (!visible(badge)) continue;
    const box = badge.getBoundingClientRect();
    const others = [...badge.parentElement.querySelectorAll("*")]
      .filter((el) => el !== badge && !badge.contains(el) && !el.contains(badge) && visible(el)
        && !el.querySelector("*:not(br)"));
    for (const other of others) {
      if (cut(box, other.getBoundingClientRect())) {
        const what = other.className || other.tagName;
        overlaps.push(`${badge.textContent} over ${what}: ${other.textContent}`);
      }
    }
  }
  // Nor a box that scrolls sideways inside the page (the expanded JSON of a row may).
  const sideways = [...document.querySelectorAll("body *")].filter((el) =>
    !["PRE", "TEXTAREA"].includes(el.tagName) && el.scrollWidth > el.clientWidth + 1
    && ["auto", "scroll"].includes(getComputedStyle(el).overflowX))
    .map((el) => el.id || el.className);
  const conn = document.getElementById("conn").getBoundingClientRect();
  return {scrollWidth: scroller.scrollWidth, clientWidth: scroller.clientWidth, overlaps, sideways,
          connInView: conn.top >= 0 && conn.bottom <= innerHeight && conn.right <= innerWidth};
}
"""


@in_browser
async def test_layout_holds_at_420_px_and_screenshots(page: Page, tmp_path: Path) -> None:
    """No horizontal scrolling, no badge over text, the connection state in view at 1280
    and 420 px; the pages are the README's screenshots (docs/ with HUB_UPDATE_SCREENSHOTS=1)."""
    async with run_hub(make_settings(instance_id="hub-1")) as hub:
        await publish_all(hub, [
            ("provider_health_change", {"provider": "openai", "old_status": "healthy",
                                        "new_status": "degraded"}),
            ("provider_health_change", {"provider": "anthropic", "old_status": "unknown",
                                        "new_status": "healthy"}),
            ("provider_health_change", {"provider": "azure", "old_status": "degraded",
                                        "new_status": "unhealthy"}),
            ("cost_threshold_alert", COST),
            ("threat_detected", {**THREAT, "severity": "medium", "attack_type": "pii_leak",
                                 "action_taken": "sanitized", "confidence": 0.71,
                                 "provider": "anthropic", "endpoint": "/v1/messages"}),
            ("system_status", {"status": "config_change", "instance_id": "hub-1",
                               "message": "HUB_OUTBOX_LIMIT changed"}),
            ("threat_detected", {**THREAT, "severity": "low", "attack_type": "encoding_trick",
                                 "action_taken": "flagged", "confidence": 0.55}),
            ("threat_detected", {**THREAT, "attack_type": "x" * 120, "provider": "p" * 80,
                                 "endpoint": "/" + "e" * 200, "tenant_id": "t" * 60}),
        ])
        await sign_in(page, hub, make_token("ops", "admin"))
        await post_event(hub, "threat_detected", {
            **THREAT, "severity": "critical", "attack_type": "jailbreak", "confidence": 0.98,
            "provider": "openai", "endpoint": "/v1/chat/completions", "tenant_id": "acme"})
        await expect(page.locator("#feed li")).to_have_count(10)  # with hub-1's "online"
        await page.evaluate("document.querySelectorAll('.ev.new').forEach(e => "
                            "e.classList.remove('new'))")
        for width in (1280, 420):
            await page.set_viewport_size({"width": width, "height": 860})
            await page.evaluate("window.scrollTo(0, 0)")
            layout = await page.evaluate(LAYOUT_CHECK)
            assert layout["scrollWidth"] <= layout["clientWidth"] == width, layout
            assert layout["sideways"] == [], layout["sideways"]
            assert layout["overlaps"] == [], layout["overlaps"]
            shot = tmp_path / f"dashboard-{width}.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("HUB_UPDATE_SCREENSHOTS") == "1":
                shutil.copyfile(shot, SCREENSHOTS / shot.name)
            await page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
            assert (await page.evaluate(LAYOUT_CHECK))["connInView"], f"at {width} px"
