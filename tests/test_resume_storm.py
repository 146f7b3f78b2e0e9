"""Fault: a reconnect storm. Thousands of plain clients that had seen event N reconnect at
once with last_event_id N after 200 more events, against two `hub serve` instances on a
private Redis, while events keep being published: every one gets exactly the events after
N, in order, once.

One instance serves the replays from its replay window; the other has a window smaller
than the gap (``HUB_REPLAY_WINDOW=100``), so its replays start with a Redis page. The
README's figures come from this test's report line (``-s``); ``HUB_STORM_CLIENTS`` sets
the number of clients (default 3,000)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync

from tests.conftest import SECRET, RedisServer, make_token, start_hub_process, stop_process
from tests.helpers import THREAT
from tests.raw_ws import RawClient

CLIENTS = int(os.environ.get("HUB_STORM_CLIENTS", "3000"))
# HUB_STORM_WINDOWS=0,0 serves every replay from Redis pages (shared between resumes).
WINDOWS = os.environ.get("HUB_STORM_WINDOWS", "2000,100").split(",")
MISSED = 200
LIVE = 20  # published while the storm resumes: the seam under load
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _commandstats(client: redis_sync.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


class Tracker:
    """What one storm client received: its event ids in order, and when it caught up."""

    __slots__ = ("caught_up", "errors", "ids", "resumed", "started")

    def __init__(self, started: float) -> None:
        self.ids: list[str] = []
        self.caught_up: float | None = None
        self.resumed = 0
        self.errors: list[Any] = []
        self.started = started

    def __call__(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "threat_detected":
            self.ids.append(message["id"])
            if len(self.ids) == MISSED:
                self.caught_up = time.monotonic() - self.started
        elif kind == "resumed":
            self.resumed += 1
        elif kind in ("error", "history_truncated"):
            self.errors.append(message)


async def test_reconnect_storm_every_client_gets_exactly_its_missed_events(
        tmp_path: Path, own_redis: RedisServer) -> None:
    env = {"JWT_SECRET": SECRET, "REDIS_URL": own_redis.url,
           "HUB_MAX_CONNECTIONS": "20000", "HUB_MAX_CONNECTIONS_PER_USER": "20000",
           # The storm's own client process is busy: its subscribes may reach the hub late.
           "HUB_RESUME_HOLD_S": "30"}
    hubs = [start_hub_process({**env, "HUB_REPLAY_WINDOW": window}, tmp_path=tmp_path)
            for window in WINDOWS]
    admin = {"Authorization": f"Bearer {make_token('proxy', role='admin')}"}
    token = make_token("storm")
    clients: list[RawClient] = []
    raw_redis = own_redis.client()
    try:
        watchers = [await RawClient.connect(h.port, token) for h in hubs]
        for watcher in watchers:  # a first message: no hold for a resume (see the env)
            watcher.send_json({"action": "subscribe", "event_types": ["threat_detected"]})

        def seen(watcher: RawClient) -> list[str]:
            return [m["id"] for m in watcher.messages if m.get("type") == "threat_detected"]

        async def until(predicate: Any, what: str, timeout: float = 120) -> None:
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.05)

        async with httpx.AsyncClient(timeout=60) as http:
            async def post(hub_index: int, n: int) -> None:
                response = await http.post(f"{hubs[hub_index].url}/events", headers=admin,
                                           json={"type": "threat_detected",
                                                 "data": {**THREAT, "n": n}})
                assert response.status_code == 202, response.text

            for n in range(MISSED + 1):  # event N (n = 0), then the 200 the storm missed
                await post(n % 2, n)
            await until(lambda: all(len(seen(w)) == MISSED + 1 for w in watchers),
                        "both instances to deliver the history")
            last_seen = seen(watchers[0])[0]  # event N: what every storm client saw last

            raw_redis.config_resetstat()
            cpu_before = [_cpu_s(h.process.pid) for h in hubs]
            started = time.monotonic()
            trackers = [Tracker(started) for _ in range(CLIENTS)]

            async def reconnect(i: int) -> RawClient:
                by_header = i % 4 < 2  # half resume at connect, half by subscribe message
                headers = {"Last-Event-ID": last_seen} if by_header else {}
                client = await RawClient.connect(hubs[i % 2].port, token, headers=headers,
                                                 on_message=trackers[i])
                if not by_header:
                    client.send_json({"action": "subscribe", "event_types": ["threat_detected"],
                                      "last_event_id": last_seen})
                return client

            async def publish_live() -> None:
                for n in range(MISSED + 1, MISSED + 1 + LIVE):
                    await post(n % 2, n)
                    await asyncio.sleep(0.05)  # spread over the storm, not synchronisation

            live = asyncio.create_task(publish_live())
            clients.extend(await asyncio.gather(*(reconnect(i) for i in range(CLIENTS))))
            connected_s = time.monotonic() - started
            try:
                await until(lambda: all(len(t.ids) >= MISSED for t in trackers),
                            "every client to catch up", timeout=60)
            except AssertionError:
                refused = sum(1 for t in trackers if t.errors)
                behind = sum(1 for t in trackers if len(t.ids) < MISSED)
                raise AssertionError(f"{behind} of {CLIENTS} clients never caught up, "
                                     f"{refused} got an error or notice, e.g. "
                                     f"{next((t.errors for t in trackers if t.errors), None)}"
                                     ) from None
            caught_up_s = time.monotonic() - started
            await live
            # A client whose replay held every live event gets its `resumed` after them.
            await until(lambda: all(len(t.ids) >= MISSED + LIVE and (t.resumed or t.errors)
                                    for t in trackers),
                        "every client to get the live events and its resumed")
            await until(lambda: all(len(seen(w)) == MISSED + 1 + LIVE for w in watchers),
                        "the watchers to get the live events")
            # CPU and Redis calls for the whole storm, the live events included.
            cpu = [_cpu_s(h.process.pid) - before
                   for h, before in zip(hubs, cpu_before, strict=True)]
            calls = _commandstats(raw_redis)
        expected = seen(watchers[0])[1:]
        assert seen(watchers[1])[1:] == expected
        wrong = [i for i, t in enumerate(trackers) if t.ids != expected]
        assert not wrong, (f"{len(wrong)} of {CLIENTS} clients got other events, e.g. "
                           f"{len(trackers[wrong[0]].ids)} ids, errors "
                           f"{trackers[wrong[0]].errors[:2]}")
        assert all(t.resumed == 1 and not t.errors for t in trackers)
        times = sorted(t.caught_up or 0.0 for t in trackers)
        history_calls = {k: v for k, v in calls.items() if k in ("xrange", "xinfo|stream",
                                                                   "xinfo")}
        print(f"\nreconnect storm: {CLIENTS} clients (2 instances, half by Last-Event-ID, half "
              f"by subscribe), {MISSED} missed + {LIVE} live events each: all connected in "
              f"{connected_s:.1f} s, all caught up in {caught_up_s:.1f} s (per client p50 "
              f"{times[len(times) // 2]:.2f} s, p99 {times[int(len(times) * 0.99)]:.2f} s); "
              f"hub CPU {cpu[0]:.1f} s (window {WINDOWS[0]}) + {cpu[1]:.1f} s (window "
              f"{WINDOWS[1]}); Redis "
              f"commands {sum(calls.values())} in all, history reads {history_calls}")
    finally:
        for client in clients:
            client.close()
        raw_redis.close()
        for hub in hubs:
            stop_process(hub.process)
