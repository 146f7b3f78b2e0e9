"""``hub serve --workers N``: the real command, several worker processes, one port, Redis.

(The refusal without Redis is in tests/test_cli.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import (
    SECRET,
    HubProcess,
    RedisServer,
    free_port,
    make_token,
    start_hub_process,
    stop_process,
)
from tests.helpers import (
    THREAT,
    close_code,
    recv_json,
    recv_type,
    send_json,
    wait_until,
    ws_connect,
)

pytestmark = pytest.mark.timeout(90)


def worker_pids(parent: int) -> set[int]:
    """The supervisor's worker processes: its children (from /proc) that multiprocessing
    spawned as workers (not its resource tracker)."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.add(int(proc.name))
    return pids


def start_workers(redis: RedisServer, tmp_path: Path, *args: str,
                  **env: str) -> tuple[HubProcess, str]:
    instance = f"wk-{os.urandom(3).hex()}"
    hub = start_hub_process({"JWT_SECRET": SECRET, "HUB_INSTANCE_ID": instance, **env},
                            "--workers", "2", "--redis-url", redis.url, *args,
                            tmp_path=tmp_path)
    wait_workers_ready(hub, {f"{instance}-w1", f"{instance}-w2"})
    return hub, instance


def wait_workers_ready(hub: HubProcess, instance_ids: set[str]) -> None:
    """start_hub_process returns when one worker answers; poll health (each request on a
    new connection, so any worker may take it) until every worker has answered."""
    seen: set[str] = set()
    # A deadline, not a count of tries: a worker spawned on a loaded machine may take a
    # while to import and bind.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            seen.add(httpx.get(f"{hub.url}/ws/health", timeout=2).json()["instance_id"])
        if seen == instance_ids:
            return
        time.sleep(0.02)
    raise AssertionError(f"workers ready: {seen}, expected {instance_ids}")


async def connect_until_all_workers(hub: HubProcess, instance_ids: set[str],
                                    limit: int = 60) -> dict[ClientConnection, str]:
    """Open connections until every worker holds one (the kernel picks the worker)."""
    clients: dict[ClientConnection, str] = {}
    for _ in range(limit):
        ws = await ws_connect(f"ws://127.0.0.1:{hub.port}/ws/events", make_token())
        hello = await recv_json(ws)
        await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"]})
        await recv_type(ws, "subscription_updated")
        clients[ws] = hello["data"]["instance_id"]
        if set(clients.values()) == instance_ids:
            return clients
    raise AssertionError(f"connections reached only {set(clients.values())}")


async def test_workers_share_one_port_and_deliver_across_workers(
        own_redis: RedisServer, tmp_path: Path) -> None:
    hub, instance = start_workers(own_redis, tmp_path)
    try:
        ids = {f"{instance}-w1", f"{instance}-w2"}
        clients = await connect_until_all_workers(hub, ids)
        assert len(worker_pids(hub.process.pid)) == 2

        # Published through whichever worker accepts the POST: every client gets it once.
        for _ in range(2):
            async with httpx.AsyncClient() as http:
                response = await http.post(
                    f"{hub.url}/events", json={"type": "threat_detected", "data": THREAT},
                    headers={"Authorization": f"Bearer {make_token('ops', 'admin')}"})
            assert response.status_code == 202
            for ws in clients:
                assert (await recv_type(ws, "threat_detected"))["id"] == response.json()["id"]

        # SIGTERM to the supervisor drains every worker: all clients see 1001.
        hub.process.send_signal(signal.SIGTERM)
        for ws in clients:
            assert await close_code(ws) == (1001, "server shutting down")
        assert hub.process.wait(30) == 0
        assert not worker_pids(hub.process.pid)
        assert "Traceback" not in hub.log()
    finally:
        stop_process(hub.process)


async def test_a_dead_worker_is_replaced(own_redis: RedisServer, tmp_path: Path) -> None:
    hub, instance = start_workers(own_redis, tmp_path)
    try:
        clients = await connect_until_all_workers(hub, {f"{instance}-w1", f"{instance}-w2"})
        before = worker_pids(hub.process.pid)
        victim = next(iter(before))
        os.kill(victim, signal.SIGKILL)
        lost = [ws for ws in clients if await is_closed_after_kill(ws)]
        assert lost, "the killed worker held connections"
        # The supervisor starts a replacement; the port keeps serving meanwhile.
        for _ in range(400):
            now = worker_pids(hub.process.pid)
            if len(now) == 2 and victim not in now:
                break
            await asyncio.sleep(0.05)  # polling the process table: no event to await
        else:
            raise AssertionError("no replacement worker")
        wait_workers_ready(hub, {f"{instance}-w1", f"{instance}-w2"})
        fresh = await connect_until_all_workers(hub, {f"{instance}-w1", f"{instance}-w2"})
        for ws in [*fresh, *(c for c in clients if c not in lost)]:
            await ws.close()
    finally:
        stop_process(hub.process)
    assert "restarting" in hub.log()


async def is_closed_after_kill(ws: ClientConnection) -> bool:
    """True for a connection the kill cut off. Live ones answer a ping; dead ones close."""
    try:
        await send_json(ws, {"action": "ping"})
        await recv_type(ws, "pong")
    except websockets.ConnectionClosed:
        return True
    return False


async def test_json_logs_from_every_process_without_tokens(own_redis: RedisServer,
                                                            tmp_path: Path) -> None:
    hub, instance = start_workers(own_redis, tmp_path, "--log-level", "info",
                                  HUB_JSON_LOGS="1")
    token = make_token()
    try:
        # A client that (wrongly) sends its token in the query string: the access log
        # prints the path, which must not carry the token.
        async with httpx.AsyncClient() as http:
            for _ in range(4):
                await http.get(f"{hub.url}/ws/health?token={token}&access_token={token}")
        hub.process.send_signal(signal.SIGTERM)
        assert hub.process.wait(30) == 0
    finally:
        stop_process(hub.process)
    lines = hub.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {e["logger"] for e in entries} >= {"hub.workers", "uvicorn.error", "hub"}
    assert len({e["pid"] for e in entries}) == 3  # the supervisor and two workers
    assert token not in hub.log()
    assert SECRET not in hub.log()
    started = [e["msg"] for e in entries if e["logger"] == "hub"]
    assert any(f"instance {instance}-w1" in m for m in started)
    assert any(f"instance {instance}-w2" in m for m in started)


def test_workers_need_a_free_port(own_redis: RedisServer) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "hub", "serve", "--port", str(port), "--workers", "2",
             "--redis-url", own_redis.url],
            env={**os.environ, "JWT_SECRET": SECRET}, capture_output=True, text=True,
            timeout=30)
    assert result.returncode == 2  # checked before anything starts (hub/cli.py check_bind)
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_connections_spread_evenly_over_the_workers(own_redis: RedisServer,
                                                          tmp_path: Path) -> None:
    """Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads new
    connections over them by hash, whichever worker is idle; the supervisor takes none."""
    from bench.procs import connections_per_process

    hub, _ = start_workers(own_redis, tmp_path)
    socks: list[socket.socket] = []
    try:
        workers = worker_pids(hub.process.pid)
        socks = [socket.create_connection(("127.0.0.1", hub.port)) for _ in range(200)]

        def held() -> dict[int, int]:
            return connections_per_process([hub.process.pid], hub.port)

        # Each worker's loop accepts shortly after the kernel completed the handshake.
        await wait_until(lambda: sum(held().values()) == len(socks), what="all accepted")
        counts = held()
        assert set(counts) == workers, counts  # every worker holds some, nothing else does
        # Binomial spread of 200 over 2 (sd ~3.5 %, ~5 % seen): 25-75 % is over 5 sd away.
        assert all(50 <= n <= 150 for n in counts.values()), counts
    finally:
        for s in socks:
            s.close()
        stop_process(hub.process)
