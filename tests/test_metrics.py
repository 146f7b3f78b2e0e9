"""GET /metrics: what DESIGN.md lists, read back the way Prometheus reads it, with one
process and with several workers; and the Grafana dashboard queries only what exists."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ROOT,
    SECRET,
    RedisServer,
    make_settings,
    make_token,
    run_hub,
    start_hub_process,
    stop_process,
)
from tests.helpers import (
    THREAT,
    close_code,
    connected,
    recv_type,
    stalled_client,
    wait_until,
    ws_connect,
)
from tests.sio_helpers import SioClient

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """Family names and every sample, keyed by (sample name, sorted labels)."""
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, samples


async def scrape(url: str) -> tuple[set[str], Samples]:
    async with httpx.AsyncClient() as http:  # a new connection each time
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


DESIGN_FAMILIES = {
    "hub_connections",                 # connections by transport
    "hub_events_published",            # events published by type
    "hub_events_delivered",            # events delivered by type
    "hub_events_dropped",              # drops
    "hub_slow_consumer_disconnects",   # slow-consumer disconnects
    "hub_auth_failures",               # auth failures by reason
    "hub_redis_reconnects",            # Redis reconnects
    "hub_publish_to_send_seconds",     # publish-to-send latency histogram
}


async def test_metrics_cover_what_the_design_lists() -> None:
    async with run_hub(make_settings()) as running:
        families, samples = await scrape(running.url)
        assert families >= DESIGN_FAMILIES
        # Both transports export a zero before anyone connects.
        assert ("hub_connections", (("transport", "socketio"),)) in samples
        assert ("hub_connections", (("transport", "websocket"),)) in samples

        ws = await connected(running.ws_url, make_token())
        sio = SioClient()
        await sio.connect(running.url, auth={"token": make_token()})
        refused = await ws_connect(running.ws_url, "not-a-token")
        assert (await close_code(refused))[0] == 4003
        event = await running.publish("threat_detected", THREAT)
        assert (await recv_type(ws, "threat_detected"))["id"] == event.id
        assert (await sio.next_event("threat_detected"))["id"] == event.id

        _, samples = await scrape(running.url)
        assert value(samples, "hub_connections", transport="websocket") == 1
        assert value(samples, "hub_connections", transport="socketio") == 1
        assert value(samples, "hub_events_published_total", type="threat_detected") == 1
        assert value(samples, "hub_events_delivered_total", type="threat_detected") == 2
        failures = {labels: v for (name, labels), v in samples.items()
                    if name == "hub_auth_failures_total"}
        assert sum(failures.values()) == 1 and all(dict(k)["reason"] for k in failures)
        # One observation per delivered event per instance (startup's system_status too).
        assert value(samples, "hub_publish_to_send_seconds_count") >= 1
        assert value(samples, "hub_publish_to_send_seconds_bucket", le="+Inf") == value(
            samples, "hub_publish_to_send_seconds_count")
        await ws.close()
        await sio.close()


async def test_slow_consumer_disconnect_and_its_discarded_events_are_counted() -> None:
    async with run_hub(make_settings(outbox_limit=20)) as running:
        _reader, stalled = await stalled_client(running.port, make_token("slow"))
        big = {"severity": "info", "message": "x" * 32_000}
        registry = running.hub.metrics.registry
        for n in range(5_000):
            await running.publish("cost_threshold_alert", {**big, "n": n})
            if registry.get_sample_value("hub_slow_consumer_disconnects_total",
                                         {"transport": "websocket"}):
                break
        _, samples = await scrape(running.url)
        stalled.transport.abort()
        assert value(samples, "hub_slow_consumer_disconnects_total", transport="websocket") == 1
        # The full outbox (20 events) and the event that overflowed it.
        assert value(samples, "hub_events_dropped_total", reason="slow_consumer") == 21


async def test_redis_reconnects_are_counted(own_redis: RedisServer) -> None:
    async with run_hub(make_settings(redis_url=own_redis.url)) as running:
        backend = running.hub.dispatcher.backend
        own_redis.stop()
        await wait_until(lambda: not backend.connected, what="the hub to notice Redis is gone")
        own_redis.start()
        await wait_until(lambda: backend.connected, timeout=30, what="the hub to reconnect")
        _, samples = await scrape(running.url)
        assert value(samples, "hub_redis_reconnects_total") >= 1


def test_dashboard_queries_only_metrics_hub_exports() -> None:
    dashboard = json.loads((ROOT / "docker" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name)
            for expr in exprs for name in re.findall(r"\bhub_[a-z_]+", expr)}
    from hub.metrics import Metrics

    declared = {family.name for family in Metrics().registry.collect()}
    assert used <= declared, f"the dashboard queries unknown metrics: {used - declared}"
    assert used >= DESIGN_FAMILIES, f"the dashboard omits {DESIGN_FAMILIES - used}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


async def test_with_several_workers_every_scrape_reports_all_of_them(
        own_redis: RedisServer, tmp_path: Path) -> None:
    from tests.test_workers import (
        connect_until_all_workers,
        is_closed_after_kill,
        wait_workers_ready,
        worker_pids,
    )

    instance = f"mx-{os.urandom(3).hex()}"
    hub = start_hub_process({"JWT_SECRET": SECRET, "HUB_INSTANCE_ID": instance},
                            "--workers", "2", "--redis-url", own_redis.url, tmp_path=tmp_path)
    try:
        ids = {f"{instance}-w1", f"{instance}-w2"}
        wait_workers_ready(hub, ids)
        clients = await connect_until_all_workers(hub, ids)
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{hub.url}/events", json={"type": "threat_detected", "data": THREAT},
                headers={"Authorization": f"Bearer {make_token('ops', 'admin')}"})
        for ws in clients:
            await recv_type(ws, "threat_detected")
        assert response.status_code == 202

        # Each scrape lands on some worker; every one must report the whole server.
        answered: set[str] = set()
        for _ in range(40):
            _, samples = await scrape(hub.url)
            assert value(samples, "hub_connections", transport="websocket") == len(clients)
            assert value(samples, "hub_events_published_total", type="threat_detected") == 1
            assert value(samples, "hub_events_delivered_total",
                         type="threat_detected") == len(clients)
            # Both workers announced themselves: two system_status events, published once each.
            assert value(samples, "hub_events_published_total", type="system_status") == 2
            async with httpx.AsyncClient() as http:
                answered.add((await http.get(f"{hub.url}/ws/health")).json()["instance_id"])
        assert answered == ids

        # A worker that dies takes its connections out of the gauge, not just its process.
        os.kill(next(iter(worker_pids(hub.process.pid))), signal.SIGKILL)
        survivors = [ws for ws in clients if not await is_closed_after_kill(ws)]
        assert 0 < len(survivors) < len(clients)
        deadline = time.monotonic() + 20
        while True:  # the supervisor notices the death and marks the process dead
            _, samples = await scrape(hub.url)
            if value(samples, "hub_connections", transport="websocket") == len(survivors):
                break
            assert time.monotonic() < deadline, "the dead worker's connections stayed counted"
            await asyncio.sleep(0.05)  # scraping until the supervisor has reaped
        for ws in survivors:
            await ws.close()
    finally:
        stop_process(hub.process)
