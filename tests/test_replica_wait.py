"""Acknowledged means on a replica, on one Redis and its replica (``redis://…?wait_replicas=1``),
with real processes: a private redis-server and another started with ``--replicaof`` it.

An append is the script, ROLE and WAIT in one pipeline (hub.dispatch.redis, ``_append``):
while the replica is frozen (SIGSTOP, its link to the master open and silent) no replica
confirms within ``wait_ms``, so POST /events answers ``durable: false`` (journalled, delivered
locally); once the replica is back the journal is appended again by id, which the script
recognises (the event is on the master already), and the event is in both streams once. A
master whose replica is gone (killed: the master drops it at once) acknowledges on itself
alone after one journalled append, rather than refuse every publish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync

from hub.config import Settings
from hub.dispatch.redis import open_redis
from hub.errors import ConfigError
from tests.conftest import (
    SECRET,
    RedisServer,
    make_settings,
    make_token,
    run_hub,
    start_with_replica,
)
from tests.failover import stream_ids
from tests.helpers import THREAT, connected, recv_json, send_json

DB = 2  # in the URL's query next to hub's options: the rest of the query reaches redis-py
WAIT_MS = 500  # a replica in sync confirms within it even on a loaded machine


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A private master and its replica, in sync."""
    master, replica = start_with_replica()
    try:
        yield master, replica
    finally:
        replica.stop()  # SIGKILL: a stopped (SIGSTOP) process too
        master.stop()


def _url(master: RedisServer, query: str = "") -> str:
    return f"redis://127.0.0.1:{master.port}?db={DB}&wait_ms={WAIT_MS}{query}"


def _ids(server: RedisServer, stream: str) -> list[str]:
    client = redis_sync.Redis(port=server.port, db=DB, decode_responses=True)
    try:
        return stream_ids(client, stream)
    finally:
        client.close()


async def _post(http: httpx.AsyncClient, url: str, seq: int) -> dict[str, Any]:
    response = await http.post(
        f"{url}/events", json={"type": "threat_detected", "data": {**THREAT, "seq": seq}},
        headers={"Authorization": f"Bearer {make_token('ops', 'admin')}"})
    assert response.status_code == 202, response.text
    return dict(response.json())


async def _healthy(http: httpx.AsyncClient, url: str) -> None:
    deadline = time.monotonic() + 15
    while (body := (await http.get(f"{url}/ws/health")).json())["status"] != "healthy":
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def test_an_append_no_replica_confirmed_is_journalled_and_appended_once_it_does(
        pair: tuple[RedisServer, RedisServer]) -> None:
    master, replica = pair
    settings = make_settings(redis_url=_url(master, "&wait_replicas=1"))
    stream = settings.stream_key
    assert replica.process is not None
    async with run_hub(settings) as hub, httpx.AsyncClient(timeout=10) as http:
        ws = await connected(hub.ws_url, make_token())
        await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"]})
        while (await recv_json(ws))["type"] != "subscription_updated":
            pass
        # The replica confirms: acknowledged durable, and on the replica at that moment.
        first = await _post(http, hub.url, 0)
        assert first["durable"] is True
        assert first["id"] in _ids(replica, stream)

        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            second = await _post(http, hub.url, 1)
            waited = time.monotonic() - began
            assert second["durable"] is False  # the master took it, no replica confirmed
            assert waited >= WAIT_MS / 1000
            third = await _post(http, hub.url, 2)  # behind it in the journal, at once
            assert third["durable"] is False
            assert second["id"] in _ids(master, stream)
            body = (await http.get(f"{hub.url}/ws/health")).json()
            assert body["status"] == "degraded", body
            assert any("journal" in reason for reason in body["reasons"]), body
            await asyncio.sleep(1.0)  # the flusher retrying meanwhile appends nothing twice
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        await _healthy(http, hub.url)  # the journal drained: the replica confirmed

        published = [first["id"], second["id"], third["id"]]
        for server in (master, replica):
            ids = _ids(server, stream)
            assert [i for i in ids if i in published] == published, (server.port, ids)
        received: list[str] = []
        while len(received) < len(published):
            message = await recv_json(ws)
            if message["type"] == "threat_detected":
                received.append(message["id"])
        assert received == published
        fourth = await _post(http, hub.url, 3)
        assert fourth["durable"] is True
        while (message := await recv_json(ws))["type"] != "threat_detected":
            pass
        assert message["id"] == fourth["id"]  # none of the others came again
        await ws.close()


async def test_a_master_left_without_replicas_acknowledges_on_itself(
        pair: tuple[RedisServer, RedisServer]) -> None:
    """ROLE says how many replicas the master has: none left, nothing to wait for (every
    publish refused until one rejoins would be an outage of its own)."""
    master, replica = pair
    settings = make_settings(redis_url=_url(master, "&wait_replicas=1"))
    async with run_hub(settings) as hub, httpx.AsyncClient(timeout=10) as http:
        answers = [await _post(http, hub.url, 0)]
        assert answers[0]["durable"] is True
        replica.stop()
        # The first append after it still expects the replica the master last reported.
        answers.append(await _post(http, hub.url, 1))
        assert answers[1]["durable"] is False
        await _healthy(http, hub.url)
        answers += [await _post(http, hub.url, seq) for seq in range(2, 5)]
        assert [a["durable"] for a in answers[2:]] == [True] * 3
        published = [a["id"] for a in answers]
        ids = _ids(master, settings.stream_key)
        assert [i for i in ids if i in published] == published, ids


async def test_wait_options_are_not_passed_to_redis_py(
        pair: tuple[RedisServer, RedisServer]) -> None:
    """redis-py would hand an unknown query option to its connections (TypeError); the
    rest of the query (here ``db``) still reaches it."""
    master, _ = pair
    client = open_redis(_url(master, "&wait_replicas=1"))
    try:
        await client.set("probe", "1")
    finally:
        await client.aclose()
    direct = redis_sync.Redis(port=master.port, db=DB)
    assert direct.get("probe") == b"1"
    direct.close()


async def test_without_wait_replicas_one_redis_sends_no_wait(
        pair: tuple[RedisServer, RedisServer]) -> None:
    """``redis://`` defaults to wait_replicas=0: the replica frozen, publishes are durable at
    once, and the master ran no WAIT."""
    master, replica = pair
    assert replica.process is not None
    settings = make_settings(redis_url=_url(master))
    async with run_hub(settings) as hub, httpx.AsyncClient(timeout=10) as http:
        os.kill(replica.process.pid, signal.SIGSTOP)
        answers = [await _post(http, hub.url, seq) for seq in range(3)]
        assert [a["durable"] for a in answers] == [True] * 3
    stats = master.client().info("commandstats")
    assert "cmdstat_wait" not in stats, stats


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?wait_replicas=9",             # out of bounds
    "redis://127.0.0.1:6379/0?wait_replicas=-1",            # not a number
    "redis://127.0.0.1:6379/0?wait_ms=0",
    "redis://127.0.0.1:6379/0?wait_ms=fast",
    "rediss://127.0.0.1:6379/0?wait_ms=",
    "unix:///tmp/redis.sock?wait_ms=20000",
    "redis+sentinel://127.0.0.1:26379/0/mymaster?wait_replicas=x",
    "redis+sentinel://127.0.0.1:26379/0/mymaster?wait_replica=1",  # unknown option
])
def test_bad_wait_options_are_refused_at_start_up_with_the_reason(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"JWT_SECRET": SECRET, "REDIS_URL": url})
    assert caught.value.message.startswith("REDIS_URL: "), caught.value.message
    assert "wait_" in caught.value.message


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", (0, 200)),
    ("redis://127.0.0.1:6379/0?wait_replicas=2&wait_ms=50", (2, 50)),
    ("redis+sentinel://127.0.0.1:26379/0/mymaster", (1, 200)),  # Sentinel: a replica
    ("redis+sentinel://127.0.0.1:26379/0/mymaster?wait_replicas=0", (0, 200)),
])
def test_wait_defaults(url: str, expected: tuple[int, int]) -> None:
    from hub.dispatch.redis import wait_options

    Settings.from_env({"JWT_SECRET": SECRET, "REDIS_URL": url})  # accepted
    stripped, options = wait_options(url)
    assert (options["wait_replicas"], options["wait_ms"]) == expected
    assert "wait_" not in stripped
