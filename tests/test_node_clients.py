"""The official Node clients against real `hub serve` processes: the spec's JavaScript
example with the `ws` package, and a socket.io-client dashboard script."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    JS_DIR,
    SECRET,
    RedisServer,
    make_settings,
    make_token,
    run_hub,
    start_hub_process,
    stop_process,
)
from tests.helpers import THREAT

ENV = {"JWT_SECRET": SECRET}


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "hub", *args], capture_output=True,
                            text=True, env={**_base_env(), **ENV, **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "REDIS_URL"}


class NodeClient:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def next(self, kind: str | None = None, timeout: float = 15) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
            if not line:
                raise AssertionError("node client exited without the expected output")
            record = json.loads(line)
            if kind is None or record["kind"] == kind:
                return dict(record)

    async def next_event(self, type_: str, timeout: float = 15) -> dict[str, Any]:
        while True:
            record = await self.next(timeout=timeout)
            if record["kind"] == "message" and record["message"]["type"] == type_:
                return dict(record["message"])
            if record["kind"] == "event" and record["name"] == type_:
                return dict(record["envelope"])
            if record["kind"] in ("close", "connect_error", "disconnect"):
                raise AssertionError(f"client ended: {record}")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def node(script: str, env: dict[str, str]) -> NodeClient:
    import os

    process = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / script), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **env})
    return NodeClient(process)


@pytest.fixture
async def clients(node_modules: Path) -> AsyncIterator[list[NodeClient]]:
    started: list[NodeClient] = []
    yield started
    for client in started:
        await client.stop()


async def test_spec_example_receives_an_event_published_with_the_cli(
        tmp_path: Path, clients: list[NodeClient]) -> None:
    hub = start_hub_process(ENV, tmp_path=tmp_path)
    try:
        token = cli("token", "--sub", "dashboard-1", "--role", "viewer", "--ttl", "10m")
        client = await node("spec_example.js", {"HUB_WS_URL": f"ws://127.0.0.1:{hub.port}"
                                                              "/ws/events", "HUB_TOKEN": token})
        clients.append(client)
        hello = await client.next("message")
        assert hello["message"]["type"] == "connection_established"
        assert hello["message"]["data"]["user_id"] == "dashboard-1"
        published = json.loads(cli("publish", "threat_detected", "--data", json.dumps(THREAT),
                                   "--url", hub.url))
        event = await client.next_event("threat_detected")
        assert event["id"] == published["id"]
        assert event["data"]["attack_type"] == "prompt_injection"
    finally:
        await client.stop()
        stop_process(hub.process)


async def test_node_clients_see_4003_for_a_bad_token(tmp_path: Path,
                                                     clients: list[NodeClient]) -> None:
    hub = start_hub_process(ENV, tmp_path=tmp_path)
    try:
        forged = cli("token", "--sub", "x", env={"JWT_SECRET": "f" * 40})
        plain = await node("spec_example.js", {"HUB_WS_URL": f"ws://127.0.0.1:{hub.port}"
                                                             "/ws/events", "HUB_TOKEN": forged})
        sio = await node("socketio_client.js", {"HUB_URL": hub.url, "HUB_TOKEN": forged})
        clients.extend([plain, sio])
        closed = await plain.next("close")
        assert (closed["code"], closed["reason"]) == (4003, "bad token signature")
        error = await sio.next("connect_error")
        assert error["message"] == "unauthorized"
        assert error["data"]["code"] == 4003
    finally:
        stop_process(hub.process)


@pytest.mark.parametrize("transports", ["websocket", "polling"])
async def test_two_instances_on_redis_reach_node_clients_on_the_other(
        tmp_path: Path, clients: list[NodeClient], redis_server: RedisServer,
        transports: str) -> None:
    env = {**ENV, "REDIS_URL": redis_server.url, "HUB_STREAM_KEY": f"hub:node:{tmp_path.name}"}
    first = start_hub_process(env, tmp_path=tmp_path)
    second = start_hub_process(env, tmp_path=tmp_path)
    try:
        token = cli("token", "--sub", "viewer")
        plain = await node("spec_example.js", {
            "HUB_WS_URL": f"ws://127.0.0.1:{second.port}/ws/events", "HUB_TOKEN": token,
            "HUB_SUBSCRIBE": "provider_health_change"})
        sio = await node("socketio_client.js", {
            "HUB_URL": second.url, "HUB_TOKEN": token, "HUB_TYPES": "threat_detected",
            "HUB_TRANSPORTS": transports})
        clients.extend([plain, sio])
        assert (await plain.next("message"))["message"]["type"] == "connection_established"
        ack = await sio.next("ack")
        assert ack["ack"] == {"subscribed_to": ["threat_detected"]}
        assert (await sio.next("connected"))["transport"] == transports
        while (await plain.next("message"))["message"]["type"] != "subscription_updated":
            pass
        threat = json.loads(cli("publish", "threat_detected", "--data", json.dumps(THREAT),
                                "--url", first.url))
        health = json.loads(cli("publish", "provider_health_change", "--data", json.dumps(
            {"provider": "anthropic", "old_status": "healthy", "new_status": "unhealthy"}),
            "--url", first.url))
        got_plain = await plain.next_event("provider_health_change")
        got_sio = await sio.next_event("threat_detected")
        assert got_plain["id"] == health["id"]
        assert set(got_plain) == {"id", "type", "timestamp", "data"}
        assert got_sio["id"] == threat["id"]
        assert set(got_sio) == {"id", "type", "timestamp", "data"}
    finally:
        for client in clients:
            await client.stop()
        stop_process(first.process)
        stop_process(second.process)


async def test_socketio_client_refreshes_across_three_token_lifetimes(
        clients: list[NodeClient]) -> None:
    """The official socket.io-client, default transports (polling, then the upgrade):
    it refreshes with the ``refresh`` event (acked) on each ``token_expiring`` and stays
    on its one connection across three short token lifetimes, receiving the events
    published in each; once it stops refreshing the last token's expiry ends it."""
    import os

    # Each notice comes 0.5-1.5 s into its token (exp is whole seconds) and leaves 3.5 s
    # for the refresh to go round (this loop, Node, the hub): a stall of a loaded machine
    # fits in that, as it did not in a 1 s window.
    ttl, lead, lifetimes = 5, 3.5, 3
    async with run_hub(make_settings(token_expiring_lead_s=lead)) as running:
        first = make_token("dashboard", ttl=ttl + 5)  # Node's start-up does not eat it
        process = await asyncio.create_subprocess_exec(
            "node", str(JS_DIR / "socketio_refresh.js"), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "HUB_URL": running.url, "HUB_TOKEN": first})
        client = NodeClient(process)
        clients.append(client)
        assert process.stdin is not None

        async def next_of(kind: str, timeout: float = ttl + 10) -> dict[str, Any]:
            record = await client.next(timeout=timeout)
            while record["kind"] in ("upgrade", "connected") and kind != record["kind"]:
                record = await client.next(timeout=timeout)
            assert record["kind"] == kind, record
            return record

        async def both(event_id: str) -> dict[str, Any]:
            """The event and the token_expiring notice, in whichever order they come."""
            got: dict[str, dict[str, Any]] = {}
            while len(got) < 2:
                record = await client.next(timeout=ttl + 10)
                if record["kind"] in ("upgrade", "connected"):
                    continue
                assert record["kind"] in ("event", "token_expiring"), record
                assert record["kind"] not in got, record  # one notice per token
                got[record["kind"]] = record
            assert got["event"]["envelope"]["id"] == event_id
            return got["token_expiring"]

        connected = await next_of("connected")
        until = time.time() + lifetimes * ttl + 1  # three short lifetimes, and more
        exp, refreshes = 0, 0
        while time.time() < until:
            published = await running.publish("threat_detected", {**THREAT, "n": refreshes})
            notice = await both(published.id)
            assert notice["data"]["exp"] >= exp  # for the current token
            process.stdin.write(json.dumps(
                {"token": make_token("dashboard", ttl=ttl)}).encode() + b"\n")
            await process.stdin.drain()
            refreshed = await next_of("refreshed")
            assert refreshed["ack"]["user_id"] == "dashboard", refreshed
            assert refreshed["ack"]["exp"] >= notice["data"]["exp"]
            assert refreshed["id"] == connected["id"]  # the same connection throughout
            exp, refreshes = refreshed["ack"]["exp"], refreshes + 1
        assert refreshes >= lifetimes
        assert refreshed["transport"] == "websocket"  # upgraded from polling by now
        last = await running.publish("threat_detected", THREAT)
        assert (await both(last.id))["data"]["exp"] == exp
        # Without a refresh the last token's expiry ends the connection.
        assert (await next_of("token_expired"))["data"]["code"] == 4003
        assert (await next_of("disconnect"))["reason"] == "io server disconnect"
