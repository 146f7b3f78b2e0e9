"""The browser dashboard (hub/static/dashboard, built from web-client/): shipped files are
fresh, and it works end to end in headless Chromium against real hub servers.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright's Python package;
a missing browser fails these tests (CI installs it) rather than skipping them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
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
from tests.helpers import COST, HEALTH, THREAT

CHROMIUM = os.environ.get("HUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WEB_CLIENT = ROOT / "web-client"
SHIPPED = ROOT / "hub" / "static" / "dashboard"
SCREENSHOT = ROOT / "docs" / "dashboard.png"
# Reconnecting after a restart takes socket.io-client's backoff (at most 5 s) plus start-up.
RECONNECT_TIMEOUT_MS = 30_000

# The browser tests share one Chromium, so they run in the module's event loop.
in_browser = pytest.mark.asyncio(loop_scope="module")
expect.set_options(timeout=10_000)


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
        await page.goto(hub.url + "/dashboard/")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        await expect(page.locator("#who")).to_have_text("carol (viewer)")
        event_id = await post_event(hub, "cost_threshold_alert", COST)
        await expect(row(page, event_id)).to_be_visible()
        await expect(page.locator("#costs")).to_contain_text("daily budget at 80%")


@in_browser
async def test_dashboard_stays_connected_across_three_token_lifetimes(page: Page) -> None:
    """Short-lived tokens in a cookie that something keeps renewing: the page refreshes
    in-band on each token_expiring and keeps its one connection (issue 15)."""
    import asyncio
    import time

    ttl = 2
    async with run_hub(make_settings(token_expiring_lead_s=1.0)) as hub:
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
            await expect(conn).to_have_attribute("data-refreshes", "4",
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
async def test_publish_form_and_screenshot(page: Page, tmp_path: Path) -> None:
    """An admin sends a test event from the form; the page with live data is kept as the
    README's screenshot (written to docs/ when HUB_UPDATE_SCREENSHOTS=1)."""
    async with run_hub(make_settings(instance_id="hub-1")) as hub:
        await sign_in(page, hub, make_token("ops", "admin"))
        await expect(page.locator("#publish")).to_be_visible()
        samples: list[tuple[str, dict[str, Any]]] = [
            ("provider_health_change", {"provider": "openai", "old_status": "healthy",
                                        "new_status": "degraded"}),
            ("provider_health_change", {"provider": "anthropic", "old_status": "unknown",
                                        "new_status": "healthy"}),
            ("provider_health_change", {"provider": "azure", "old_status": "degraded",
                                        "new_status": "unhealthy"}),
            ("threat_detected", {**THREAT, "severity": "critical", "attack_type": "jailbreak",
                                 "confidence": 0.98}),
            ("cost_threshold_alert", COST),
            ("threat_detected", {**THREAT, "severity": "medium", "attack_type": "pii_leak",
                                 "action_taken": "sanitized", "confidence": 0.71}),
            ("system_status", {"status": "config_change", "instance_id": "hub-1",
                               "message": "HUB_OUTBOX_LIMIT changed"}),
            ("threat_detected", {**THREAT, "severity": "low", "attack_type": "encoding_trick",
                                 "action_taken": "flagged", "confidence": 0.55}),
        ]
        for type_, data in samples:
            await hub.publish(type_, data)
        await page.click("#publish-send")  # the form's default: a high prompt_injection
        result = page.locator("#publish-result")
        await expect(result).to_contain_text("Published ")
        sent_id = (await result.text_content() or "").removeprefix("Published ").strip()
        await expect(row(page, sent_id)).to_be_visible()
        await expect(page.locator("#feed li")).to_have_count(len(samples) + 1)
        await expect(page.locator(".banner[data-key=system]")).to_contain_text("hub-1")
        await page.locator("#feed li summary").nth(1).click()
        await page.evaluate("document.querySelectorAll('.ev.new').forEach(e => "
                            "e.classList.remove('new'))")
        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("HUB_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)


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


@in_browser
async def test_dashboard_works_under_its_csp_and_keeps_the_token_in_memory(page: Page) -> None:
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    async with run_hub(make_settings()) as hub:
        await page.add_init_script(
            "document.addEventListener('securitypolicyviolation', e => "
            "(window.__csp = window.__csp || []).push(e.violatedDirective + ' ' + e.blockedURI))")
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
