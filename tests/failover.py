"""The failover-under-load harness shared by tests/test_sentinel.py and tests/test_cluster.py.

Counting clients (plain WebSocket and Socket.IO) on every instance, a publisher that posts
events at a steady rate through ``POST /events`` while a fault is applied and the promotion
awaited, and the per-client tally of what arrived against what was acknowledged. Each test
keeps its own fault, promotion check and assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import redis as redis_sync
import socketio

from tests.conftest import SECRET, HubProcess, make_token, start_hub_process, stop_process
from tests.helpers import connected, recv_json, send_json, wait_until


class Plain:
    """A plain WebSocket client that keeps every event of ``types`` it receives."""

    def __init__(self, name: str, types: list[str]) -> None:
        self.name = name
        self.types = types
        self.received: list[dict[str, Any]] = []
        self.closed: int | None = None
        self.ready = asyncio.Event()

    async def run(self, url: str) -> None:
        ws = await connected(url, make_token(self.name))
        await send_json(ws, {"action": "subscribe", "event_types": self.types})
        while (await recv_json(ws))["type"] != "subscription_updated":
            pass
        self.ready.set()
        try:
            while True:
                message = await recv_json(ws, timeout=3600)
                if message["type"] in self.types:
                    self.received.append(message)
        except asyncio.CancelledError:
            await ws.close()
            raise
        except Exception:
            self.closed = ws.close_code
            raise


class Sio:
    """A Socket.IO client (no reconnection: a disconnect is counted, not hidden)."""

    def __init__(self, name: str, types: list[str]) -> None:
        self.name = name
        self.types = types
        self.received: list[dict[str, Any]] = []
        self.client = socketio.AsyncClient(reconnection=False)
        self.disconnects = 0
        for type_ in types:
            self.client.on(type_, self._event)
        self.client.on("disconnect", self._disconnect)

    async def _event(self, envelope: dict[str, Any]) -> None:
        self.received.append(envelope)

    async def _disconnect(self, reason: Any = None) -> None:
        self.disconnects += 1

    async def connect(self, url: str) -> None:
        await self.client.connect(url, auth={"token": make_token(self.name),
                                             "event_types": self.types},
                                  transports=["websocket"], wait_timeout=10)


class Clients:
    """One plain and one Socket.IO client on each instance."""

    def __init__(self, hubs: list[HubProcess], types: list[str]) -> None:
        self.hubs = hubs
        self.plains = [Plain(f"plain-{n}", types) for n in range(len(hubs))]
        self.sios = [Sio(f"sio-{n}", types) for n in range(len(hubs))]
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def all(self) -> list[Plain | Sio]:
        return [*self.plains, *self.sios]

    async def connect(self) -> None:
        self.tasks = [asyncio.create_task(p.run(h.url.replace("http", "ws") + "/ws/events"))
                      for p, h in zip(self.plains, self.hubs, strict=True)]
        for plain in self.plains:
            await asyncio.wait_for(plain.ready.wait(), 10)
        for sio, hub in zip(self.sios, self.hubs, strict=True):
            await sio.connect(hub.url)

    def stayed_connected(self) -> bool:
        return (all(c.closed is None for c in self.plains)
                and all(s.disconnects == 0 for s in self.sios))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sio in self.sios:
            await sio.client.disconnect()


class Sent(NamedTuple):
    """Where and when an acknowledged event was published."""

    instance: str
    type: str
    sent: float    # request sent
    acked: float   # 202 received


class SteadyLoad:
    """Events posted at ``rate_hz`` (both instances together, in turn) through
    ``POST /events`` while a fault is applied and the promotion awaited."""

    def __init__(self, hubs: list[HubProcess], rate_hz: float,
                 event: Callable[[int], tuple[str, dict[str, Any]]]) -> None:
        self.hubs = hubs
        self.rate_hz = rate_hz
        self.event = event  # seq -> (type, data)
        self.published: list[tuple[int, str, int, str]] = []  # (seq, instance, status, id)
        self.timing: dict[int, tuple[float, float]] = {}  # seq -> (sent, answer received)
        self.journalled: list[int] = []
        self.latency: list[float] = []
        self.killed_at: float | None = None
        self.promoted_at: float | None = None
        self._admin = {"Authorization": f"Bearer {make_token('ops', 'admin')}"}

    async def _post(self, http: httpx.AsyncClient, seq: int) -> None:
        hub = self.hubs[seq % len(self.hubs)]
        type_, data = self.event(seq)
        began = time.monotonic()
        try:
            response = await http.post(f"{hub.url}/events", headers=self._admin,
                                       json={"type": type_, "data": data})
            self.latency.append(time.monotonic() - began)
            self.timing[seq] = (began, time.monotonic())
            body = response.json() if response.status_code == 202 else {}
            if body.get("durable") is False:
                self.journalled.append(seq)
            self.published.append((seq, hub.url, response.status_code, body.get("id", "")))
        except httpx.HTTPError as exc:
            self.published.append((seq, hub.url, -1, type(exc).__name__))

    async def run(self, *, before_s: float, after_s: float, fault: Callable[[], None],
                  promoted: Callable[[int], Awaitable[bool]]) -> None:
        """Publish; ``fault()`` once ``before_s`` has passed; ``promoted(seq)`` on each tick
        until it says the replica took over; stop ``after_s`` after that. Fails when no
        failover comes within 30 s."""
        async with httpx.AsyncClient(timeout=10) as http:
            posts: list[asyncio.Task[None]] = []
            start = time.monotonic()
            for seq in itertools.count():
                # A steady rate: each request starts on its tick, whatever the others take.
                await asyncio.sleep(max(0.0, start + seq / self.rate_hz - time.monotonic()))
                posts.append(asyncio.create_task(self._post(http, seq)))
                now = time.monotonic()
                if self.killed_at is None and now - start >= before_s:
                    fault()
                    self.killed_at = now
                if (self.killed_at is not None and self.promoted_at is None
                        and await promoted(seq)):
                    self.promoted_at = now
                if self.promoted_at is not None and now - self.promoted_at >= after_s:
                    break
                assert self.killed_at is None or now - self.killed_at < 30, \
                    "no failover within 30 s"
            await asyncio.gather(*posts)
        assert self.killed_at is not None and self.promoted_at is not None

    @property
    def failover_s(self) -> float:
        assert self.killed_at is not None and self.promoted_at is not None
        return self.promoted_at - self.killed_at

    def acked(self) -> list[tuple[int, str, int, str]]:
        return [p for p in sorted(self.published) if p[2] == 202]

    def refused(self) -> list[tuple[int, str, int, str]]:
        return [p for p in self.published if p[2] != 202]

    def source(self) -> dict[str, Sent]:
        """Acknowledged event id -> where and when it was published."""
        return {p[3]: Sent(p[1], self.event(p[0])[0], *self.timing[p[0]])
                for p in self.acked()}


def out_of_order(ids: list[str], source: Mapping[str, Sent],
                 group: Callable[[Sent], object]) -> int:
    """Events arriving after one of the same ``group`` whose request was sent only after
    their own 202 came back (requests in flight at once have no order among them)."""
    latest_sent: dict[object, float] = {}
    count = 0
    for event_id in ids:
        if event_id in source:
            sent = source[event_id]
            key = group(sent)
            count += sent.acked < latest_sent.get(key, -1.0)
            latest_sent[key] = max(sent.sent, latest_sent.get(key, -1.0))
    return count


def tally(received: list[dict[str, Any]], expected: Collection[str],
          source: Mapping[str, Sent]) -> dict[str, int]:
    """Lost / duplicated / foreign of ``received`` against the ids ``expected``; out of
    order: in publish order per publishing instance and type (what hub promises)."""
    ids = [m["id"] for m in received]
    wanted = set(expected)
    return {
        "received": len(ids),
        "lost": len(wanted - set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "out_of_order": out_of_order(ids, source, lambda s: (s.instance, s.type)),
        "foreign": len(set(ids) - wanted),
    }


async def settle(clients: Clients, expected: Collection[str],
                 source: Mapping[str, Sent]) -> None:
    """Up to 30 s for every client to have every expected event (what is still missing
    then is reported by the tally, not here)."""
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: not any(tally(c.received, expected, source)["lost"]
                                         for c in clients.all), 30,
                         "every client has every event")


async def wait_healthy(hubs: list[HubProcess]) -> None:
    """Both instances on the new master: their health (write path, read path, round trip
    of a marker through the stream) says healthy again."""
    health: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        deadline = time.monotonic() + 30
        while True:
            for h in hubs:  # a hub busy catching up may answer late: ask again
                try:
                    health[h.url] = (await http.get(f"{h.url}/ws/health")).json()
                except httpx.HTTPError as exc:
                    health[h.url] = {"status": f"no answer ({type(exc).__name__})"}
            if all(v["status"] == "healthy" for v in health.values()):
                return
            assert time.monotonic() < deadline, f"not healthy after the failover: {health}"
            await asyncio.sleep(0.2)


def assert_delivered(hubs: list[HubProcess], clients: Clients,
                     figures: dict[str, dict[str, int]], report: str) -> None:
    """Both instances alive, no client dropped, every expected event reached every client
    once, in order."""
    for hub in hubs:
        assert hub.process.poll() is None, hub.log()
    assert clients.stayed_connected(), report
    for name, figure in figures.items():
        assert figure["lost"] == 0 and figure["duplicated"] == 0, (name, report)
        assert figure["out_of_order"] == 0 and figure["foreign"] == 0, (name, report)


def stream_ids(client: redis_sync.Redis | redis_sync.RedisCluster, stream: str) -> list[str]:
    """Event ids in stream order (an event appended after an outage at a later position
    keeps its id in field ``i``; health markers carry no event)."""
    entries: list[tuple[str, dict[str, str]]] = client.xrange(stream)  # type: ignore[assignment]
    return [fields.get("i", entry) for entry, fields in entries if "e" in fields]


def hub_env(redis_url: str, stream: str, unique: str, tmp_path: Path) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "JWT_SECRET": SECRET, "HUB_STREAM_KEY": stream,
            "HUB_SOCKETIO_CHANNEL": f"socketio-{unique}", "HUB_JSON_LOGS": "0",
            "HUB_JOURNAL_DIR": str(tmp_path / "journal")}


@contextlib.contextmanager
def two_hubs(env: dict[str, str], prefix: str, tmp_path: Path) -> Iterator[list[HubProcess]]:
    """Two ``hub serve`` processes on ``env``, instance ids ``{prefix}-a`` and ``-b``."""
    hubs: list[HubProcess] = []
    try:
        for name in ("a", "b"):
            hubs.append(start_hub_process({**env, "HUB_INSTANCE_ID": f"{prefix}-{name}"},
                                          tmp_path=tmp_path))
        yield hubs
    finally:
        for hub in hubs:
            stop_process(hub.process)
