"""socket.io-client's default path (long-polling, then the upgrade to WebSocket) while
events are published without pause: every socket receives every event published after
it connected, once and in order, whichever step of the upgrade it is at (some hold their
upgrade before the probe, after ``3probe``, after ``5``); every POST answers 202. On the
memory backend and on two instances sharing Redis.

Sized to run in seconds; ``HUB_UPGRADE_CLIENTS``/``HUB_UPGRADE_RATE``/
``HUB_UPGRADE_SECONDS`` scale it up (the issue's full size is 100 clients at 200 events/s).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    JS_DIR,
    SECRET,
    HubProcess,
    RedisServer,
    make_token,
    start_hub_process,
    stop_process,
)
from tests.helpers import THREAT

CLIENTS = int(os.environ.get("HUB_UPGRADE_CLIENTS", "40"))
RATE = float(os.environ.get("HUB_UPGRADE_RATE", "200"))
HOLDS = "none,probe,3probe,5"


async def _publisher(urls: list[str], token: str, stop: asyncio.Event,
                     state: dict[str, Any]) -> None:
    """POST threat_detected events with an increasing ``seq`` at ``RATE`` a second, one
    after the other (so the stream's order is ``seq`` order), alternating between hubs."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=10) as http:
        started = time.monotonic()
        while not stop.is_set() and state["next"] < state["stop_at"]:
            seq = state["next"]
            state["in_flight"] = True  # it may be published before its answer arrives
            response = await http.post(f"{urls[seq % len(urls)]}/events",
                                       json={"type": "threat_detected",
                                             "data": {**THREAT, "seq": seq}})
            state["statuses"][response.status_code] = \
                state["statuses"].get(response.status_code, 0) + 1
            state["next"] = seq + 1
            state["in_flight"] = False
            # Pacing, not synchronisation: hold the rate near RATE.
            delay = started + state["next"] / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def run_load(hubs: list[HubProcess], clients: int = CLIENTS) -> dict[str, Any]:
    """Connect ``clients`` sockets while publishing; return what each received."""
    viewer = make_token("viewer-1")
    admin = make_token("publisher", role="admin")
    process = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / "upgrade_load.js"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=1 << 24,
        env={**os.environ, "HUB_URLS": ",".join(h.url for h in hubs), "HUB_TOKEN": viewer,
             "HUB_CLIENTS": str(clients), "HUB_HOLDS": HOLDS, "HUB_HOLD_MS": "300",
             "HUB_STAGGER_MS": str(max(5, int(2000 / clients)))})
    assert process.stdout is not None and process.stdin is not None
    state: dict[str, Any] = {"next": 0, "in_flight": False, "statuses": {},
                             "stop_at": float("inf")}
    stop = asyncio.Event()
    publisher = asyncio.create_task(_publisher([h.url for h in hubs], admin, stop, state))
    connected_at: dict[int, int] = {}
    reports: list[dict[str, Any]] = []
    try:
        while len(connected_at) < clients:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            if not line:
                assert process.stderr is not None
                error = (await process.stderr.read()).decode()[-3000:]
                raise AssertionError(f"the Node clients exited early: {error}")
            record = json.loads(line)
            assert record["kind"] == "connected", record
            # Published from here on: must arrive. A POST still awaiting its answer may
            # have been published before this socket connected: not counted.
            connected_at[record["i"]] = state["next"] + (1 if state["in_flight"] else 0)
        # Keep publishing past the last connect, long enough for every held upgrade.
        state["stop_at"] = state["next"] + int(RATE)
        await publisher
        last = state["next"] - 1
        process.stdin.write(f"end {last}\n".encode())
        await process.stdin.drain()
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            if not line:
                assert process.stderr is not None
                error = (await process.stderr.read()).decode()[-3000:]
                raise AssertionError(f"the Node clients exited without reporting: {error}")
            record = json.loads(line)
            if record["kind"] == "done":
                break
            reports.append(record)
    finally:
        stop.set()
        if not publisher.done():
            publisher.cancel()
        if process.returncode is None:
            process.kill()
        await process.wait()
    return {"connected_at": connected_at, "reports": reports, "last": last,
            "statuses": state["statuses"], "published": state["next"]}


def check(result: dict[str, Any]) -> dict[str, int]:
    """Assert every socket got every event from its connect on, once, in order."""
    counts = {"lost": 0, "duplicated": 0, "reordered": 0}
    problems = []
    for report in result["reports"]:
        seqs: list[int] = report["seqs"]
        first = result["connected_at"][report["i"]]
        wanted = set(range(first, result["last"] + 1))
        lost = len(wanted - set(seqs))
        duplicated = len(seqs) - len(set(seqs))
        reordered = sum(1 for a, b in itertools.pairwise(seqs) if b < a)
        counts["lost"] += lost
        counts["duplicated"] += duplicated
        counts["reordered"] += reordered
        if lost or duplicated or reordered or report["errors"] or not report["upgraded"]:
            problems.append({k: report[k] for k in ("i", "hold", "errors", "upgraded",
                                                    "transport")}
                            | {"lost": lost, "duplicated": duplicated,
                               "reordered": reordered})
    assert result["statuses"] == {202: result["published"]}, result["statuses"]
    assert len(result["reports"]) == len(result["connected_at"])
    assert not problems, problems[:10]
    received = sum(len(r["seqs"]) for r in result["reports"])
    print(f"upgrade load: {len(result['reports'])} clients, {result['published']} events "
          f"published, {received} received, {counts}")
    return counts


@pytest.fixture
def hub_env(tmp_path: Path) -> dict[str, str]:
    return {"JWT_SECRET": SECRET, "HUB_STREAM_KEY": f"hub:upgrade:{tmp_path.name}",
            "HUB_SOCKETIO_CHANNEL": f"sio-upgrade-{tmp_path.name}"}


async def test_default_transports_under_publishing_memory(
        tmp_path: Path, node_modules: Path, hub_env: dict[str, str]) -> None:
    hub = start_hub_process({k: v for k, v in hub_env.items()}, tmp_path=tmp_path)
    try:
        check(await run_load([hub]))
    finally:
        stop_process(hub.process)
    assert "Traceback" not in hub.log(), hub.log()[-3000:]


async def test_default_transports_under_publishing_two_redis_instances(
        tmp_path: Path, node_modules: Path, hub_env: dict[str, str],
        redis_server: RedisServer) -> None:
    env = {**hub_env, "REDIS_URL": redis_server.url}
    first = start_hub_process(env, tmp_path=tmp_path)
    second = start_hub_process(env, tmp_path=tmp_path)
    try:
        check(await run_load([first, second]))
    finally:
        stop_process(first.process)
        stop_process(second.process)
    for hub in (first, second):
        assert "Traceback" not in hub.log(), hub.log()[-3000:]
