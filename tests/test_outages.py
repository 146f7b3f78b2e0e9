"""Acknowledged means delivered: faults the first fault suite does not stage, with real
processes (two `hub serve` instances, a private redis-server, plain and Socket.IO clients).

Every scenario publishes through POST /events on both instances, alternating, while a fault
runs: Redis refusing writes (maxmemory + noeviction), Redis frozen (SIGSTOP then SIGCONT),
Redis restarted empty, an instance stopped (SIGTERM) or killed (kill -9) during an outage and
started again. Each client counts by the sequence number in the data: lost, duplicated, out
of order (per publishing instance), and id changed (not the id its 202 returned). Health must
turn degraded, with the reason, while Redis refuses or is frozen. The report lines printed
(``-s``) are the figures in the README's Guarantees section."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import (
    SECRET,
    HubProcess,
    RedisServer,
    make_token,
    start_hub_process,
    stop_process,
)
from tests.helpers import connected
from tests.sio_helpers import SioClient

EVENTS = 1_000
RATE = 100.0  # per second, alternating between the instances
PLAIN_PER_INSTANCE = 8
SIO_PER_INSTANCE = 4
FAULT_S = 5.0


@dataclass
class Client:
    instance: int
    got: list[tuple[int, str]] = field(default_factory=list)  # (n, id) in arrival order


@dataclass
class Scenario:
    redis: RedisServer
    tmp_path: Path
    hubs: list[HubProcess] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    acked: dict[int, tuple[str, int, bool]] = field(default_factory=dict)  # n -> id, hub, durable
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    degraded_after: list[float | None] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)
    unanswered: int = 0
    slowest_s: float = 0.0  # the longest POST /events took

    @property
    def env(self) -> dict[str, str]:
        return {"JWT_SECRET": SECRET, "REDIS_URL": self.redis.url, "HUB_CLIENT_RATE": "1000",
                "HUB_MAX_CONNECTIONS_PER_USER": "1000", "HUB_SHUTDOWN_TIMEOUT_S": "2",
                "HUB_JOURNAL_DIR": str(self.tmp_path / "journal")}

    def start_hub(self, port: int | None = None) -> HubProcess:
        return start_hub_process(self.env, tmp_path=self.tmp_path, port=port)

    async def connect_clients(self, index: int) -> None:
        hub = self.hubs[index]
        token = make_token("watcher")
        for _ in range(PLAIN_PER_INSTANCE):
            ws = await connected(f"ws://127.0.0.1:{hub.port}/ws/events", token)
            client = Client(index)
            self.clients.append(client)
            self.readers.append(asyncio.create_task(_read_plain(ws, client)))
            self.closers.append(ws.close)
        for _ in range(SIO_PER_INSTANCE):
            sio = SioClient()
            await sio.connect(hub.url, auth={"token": token, "event_types": ["threat_detected"]})
            client = Client(index)
            self.clients.append(client)
            self.readers.append(asyncio.create_task(_read_sio(sio, client)))
            self.closers.append(sio.close)

    async def health(self, index: int) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as http:
            return dict((await http.get(f"{self.hubs[index].url}/ws/health")).json())

    async def watch_health(self, started: float, until: asyncio.Event) -> None:
        """Record, per instance, how long after ``started`` health first said degraded."""
        self.degraded_after = [None] * len(self.hubs)
        self.reasons = [[] for _ in self.hubs]
        while not until.is_set() and None in self.degraded_after:
            for index in range(len(self.hubs)):
                if self.degraded_after[index] is None:
                    with contextlib.suppress(httpx.HTTPError):
                        body = await self.health(index)
                        if body["status"] == "degraded":
                            self.degraded_after[index] = time.monotonic() - started
                            self.reasons[index] = body["reasons"]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), 0.05)  # poll health, not a sync point

    async def publish_all(self, fault: Callable[[], Coroutine[Any, Any, None]],
                          targets: Callable[[int], int] = lambda n: n % 2,
                          may_fail: Callable[[], bool] = lambda: False) -> None:
        """``may_fail``: while it says so, a request may get no reply (its instance was
        killed under it); that event was never acknowledged, so it is not counted."""
        admin = {"Authorization": f"Bearer {make_token('proxy', role='admin')}"}
        fault_task: asyncio.Task[None] | None = None
        async with httpx.AsyncClient(timeout=30) as http:
            started = time.monotonic()
            for n in range(EVENTS):
                if n == EVENTS // 4:
                    fault_task = asyncio.create_task(fault())
                index = targets(n)
                sent = time.monotonic()
                try:
                    response = await http.post(
                        f"{self.hubs[index].url}/events", headers=admin,
                        json={"type": "threat_detected", "data": {
                            "severity": "high", "attack_type": "x", "confidence": 0.5,
                            "action_taken": "blocked", "n": n, "src": index}})
                except httpx.TransportError:
                    if not may_fail():
                        raise
                    self.unanswered += 1
                    continue
                assert response.status_code == 202, response.text
                self.slowest_s = max(self.slowest_s, time.monotonic() - sent)
                body = response.json()
                self.acked[n] = (body["id"], index, body["durable"])
                delay = started + (n + 1) / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # a steady publisher: the scenario's pace
        assert fault_task is not None
        await fault_task

    async def settle(self, clients: list[Client]) -> None:
        """Wait for every client to have every acknowledged event (or give up after a
        generous bound, and let the counts say what is missing)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len({n for n, _ in c.got}) >= len(self.acked) for c in clients):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # let any duplicate that is on its way arrive, to count it

    def count(self, clients: list[Client]) -> dict[str, int]:
        lost = duplicated = out_of_order = id_changed = 0
        for client in clients:
            seen = [n for n, _ in client.got]
            lost += len(set(self.acked) - set(seen))
            duplicated += len(seen) - len(set(seen))
            for n, event_id in client.got:
                if n in self.acked and self.acked[n][0] != event_id:
                    id_changed += 1
            for src in (0, 1):
                mine = [n for n in seen if n in self.acked and self.acked[n][1] == src]
                out_of_order += sum(1 for a, b in itertools.pairwise(mine) if b < a)
        return {"lost": lost, "duplicated": duplicated, "out_of_order": out_of_order,
                "id_changed": id_changed}

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        for close in self.closers:
            with contextlib.suppress(TimeoutError, OSError, RuntimeError, Exception):
                await asyncio.wait_for(close(), 5)
        for hub in self.hubs:
            stop_process(hub.process)
        if self.redis.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.redis.process.pid, signal.SIGCONT)


async def _read_plain(ws: Any, client: Client) -> None:
    with contextlib.suppress(Exception):
        while True:
            message = orjson.loads(await ws.recv())
            if message.get("type") == "threat_detected":
                client.got.append((message["data"]["n"], message["id"]))


async def _read_sio(sio: SioClient, client: Client) -> None:
    while True:
        envelope = await sio.next_event("threat_detected", timeout=3600)
        client.got.append((envelope["data"]["n"], envelope["id"]))


@pytest.fixture
async def scenario(own_redis: RedisServer, tmp_path: Path) -> Any:
    run = Scenario(own_redis, tmp_path)
    run.hubs = [run.start_hub(), run.start_hub()]
    try:
        for index in range(2):
            await run.connect_clients(index)
        yield run
    finally:
        await run.close()


def _report(name: str, run: Scenario, clients: list[Client], counts: dict[str, int],
            extra: str = "") -> None:
    journalled = sum(1 for _, _, durable in run.acked.values() if not durable)
    health = ", ".join("-" if t is None else f"{t:.2f}s" for t in run.degraded_after)
    print(f"\noutage[{name}]: {len(run.acked)} events acknowledged ({journalled} journalled, "
          f"\"durable\": false), {len(clients)} clients: {counts['lost']} lost, "
          f"{counts['duplicated']} duplicated, {counts['out_of_order']} out of order, "
          f"{counts['id_changed']} id changed; slowest 202 {run.slowest_s:.2f}s; "
          f"health degraded after {health}{extra}")


async def _redis_fault(run: Scenario, apply: Callable[[], None], restore: Callable[[], None],
                       name: str, expect_reason: str | None) -> None:
    async def fault() -> None:
        stop_watching = asyncio.Event()
        apply()
        watcher = asyncio.create_task(run.watch_health(time.monotonic(), stop_watching))
        await asyncio.sleep(FAULT_S)  # how long the fault lasts: the scenario itself
        stop_watching.set()
        await watcher
        restore()

    await run.publish_all(fault)
    await run.settle(run.clients)
    counts = run.count(run.clients)
    _report(name, run, run.clients, counts)
    assert counts == {"lost": 0, "duplicated": 0, "out_of_order": 0, "id_changed": 0}
    assert None not in run.degraded_after, "health never said degraded during the fault"
    if expect_reason is not None:
        assert all(any(expect_reason in r for r in reasons) for reasons in run.reasons), \
            run.reasons


async def test_redis_refusing_writes(scenario: Scenario) -> None:
    client = scenario.redis.client()
    client.config_set("maxmemory-policy", "noeviction")

    def refuse() -> None:
        client.config_set("maxmemory", 1)

    def accept() -> None:
        client.config_set("maxmemory", 0)

    await _redis_fault(scenario, refuse, accept, "maxmemory noeviction", "maxmemory")
    assert any(not durable for _, _, durable in scenario.acked.values())


async def test_redis_frozen(scenario: Scenario) -> None:
    assert scenario.redis.process is not None
    pid = scenario.redis.process.pid
    await _redis_fault(scenario, lambda: os.kill(pid, signal.SIGSTOP),
                       lambda: os.kill(pid, signal.SIGCONT), "SIGSTOP", None)


async def test_redis_restarted_empty(scenario: Scenario) -> None:
    await _redis_fault(scenario, scenario.redis.stop, scenario.redis.start,
                       "restart empty", None)


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
async def test_instance_stopped_during_an_outage(scenario: Scenario, how: str) -> None:
    """Redis refuses writes; instance 0 has journalled what it acknowledged; it is stopped
    (or killed) and started again while Redis still refuses, then Redis recovers: the new
    instance appends the old one's journal, and instance 1's clients get every event."""
    run = scenario
    client = run.redis.client()
    client.config_set("maxmemory-policy", "noeviction")
    port = run.hubs[0].port
    down = asyncio.Event()

    async def fault() -> None:
        client.config_set("maxmemory", 1)
        await asyncio.sleep(FAULT_S / 2)  # publishes keep going: the outage's first half
        process = run.hubs[0].process
        down.set()
        if how == "SIGTERM":
            await asyncio.to_thread(stop_process, process)
        else:
            process.kill()
            await asyncio.to_thread(process.wait)
        run.hubs[0] = await asyncio.to_thread(run.start_hub, port)
        down.clear()
        await asyncio.sleep(FAULT_S / 2)
        client.config_set("maxmemory", 0)

    def target(n: int) -> int:
        # While instance 0 restarts, its share goes to instance 1 (the publisher fails over).
        return 1 if down.is_set() else n % 2

    await run.publish_all(fault, target, may_fail=lambda: how == "kill -9" and down.is_set())
    assert run.unanswered <= 1  # at most the request in flight when the instance died
    survivors = [c for c in run.clients if c.instance == 1]
    await run.settle(survivors)
    counts = run.count(survivors)
    log = run.hubs[0].log()
    _report(how + " during maxmemory", run, survivors, counts,
            extra=" (instance 0's clients went with it)")
    assert counts == {"lost": 0, "duplicated": 0, "out_of_order": 0, "id_changed": 0}
    assert "adopting" in log, log
