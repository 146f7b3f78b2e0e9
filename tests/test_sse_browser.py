"""An ``EventSource`` in headless Chromium, signed in by the ``ks_access_token`` cookie,
loses nothing across a restart of a Redis-backed ``hub serve`` process: it reconnects by
itself with Last-Event-ID and gets what was published while the hub was down, then live
events, each once and in order.

Chromium is Debian's, driven by Playwright's Python package (as tests/test_dashboard.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub import Publisher
from hub.config import Settings
from tests.conftest import (
    SECRET,
    RedisServer,
    free_port,
    make_token,
    start_hub_process,
    stop_process,
)
from tests.helpers import THREAT

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - CI installs it
    pytest.fail("the browser tests need Playwright's Python package", pytrace=False)

CHROMIUM = os.environ.get("HUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.timeout(120)

LISTEN = """
window.received = []; window.opened = 0; window.resumed = [];
const source = new EventSource('/events/stream?types=threat_detected');
source.onopen = () => { window.opened += 1; };
source.addEventListener('threat_detected', (e) => {
  window.received.push({id: e.lastEventId, data: JSON.parse(e.data).id});
});
source.addEventListener('resumed', (e) => { window.resumed.push(JSON.parse(e.data).data); });
"""


async def post(url: str, n: int) -> str:
    admin = make_token("ops", "admin")
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{url}/events", json={"type": "threat_detected",
                                                          "data": {**THREAT, "n": n}},
                                   headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def received(page: Page, count: int) -> list[dict[str, Any]]:
    await page.wait_for_function(f"window.received.length >= {count}", timeout=30_000)
    got: list[dict[str, Any]] = await page.evaluate("window.received")
    return got


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - before any I/O
        pytest.fail(f"Chromium is required and is missing at {CHROMIUM}")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context()
        yield await context.new_page()
        await browser.close()


async def test_event_source_by_cookie_loses_nothing_across_a_hub_restart(
        page: Page, own_redis: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    env = {"JWT_SECRET": SECRET, "REDIS_URL": own_redis.url, "HUB_SSE_RETRY_MS": "200"}
    hub = start_hub_process(env, "--host", "127.0.0.1", port=port, tmp_path=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        await page.context.add_cookies([{"name": "ks_access_token", "value": make_token(),
                                         "url": url}])
        await page.goto(url + "/ws/health")  # any page of the hub's origin
        await page.evaluate(LISTEN)
        await page.wait_for_function("window.opened === 1")
        before = [await post(url, n) for n in range(3)]
        assert [e["id"] for e in await received(page, 3)] == before

        stop_process(hub.process)  # a graceful stop: the stream ends after the flush
        async with Publisher(own_redis.url, stream_key=Settings().stream_key) as publisher:
            missed = [(await publisher.publish("threat_detected", {**THREAT, "n": n})).id
                      for n in range(3, 6)]
        hub = start_hub_process(env, "--host", "127.0.0.1", port=port, tmp_path=tmp_path)
        await page.wait_for_function("window.resumed.length === 1", timeout=30_000)
        after = [await post(url, n) for n in range(6, 8)]
        got = await received(page, 8)
        assert [e["id"] for e in got] == [*before, *missed, *after]  # each once, in order
        assert all(e["id"] == e["data"] for e in got)  # id: is the envelope's id
        assert (await page.evaluate("window.resumed"))[0]["replayed"] == len(missed)
        assert await page.evaluate("window.opened") >= 2  # it did reconnect by itself
    finally:
        stop_process(hub.process)
