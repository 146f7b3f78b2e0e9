"""Sentinel failover under load, with real processes.

A Redis master, one replica and three sentinels (``redis-server FILE --sentinel``) on free
ports; two ``hub serve`` instances on ``REDIS_URL=redis+sentinel://…``; plain WebSocket and
Socket.IO clients on both; events published at a steady rate through ``POST /events``,
alternating instances. The master is killed with SIGKILL mid-stream, the sentinels promote
the replica, and every client's stream is checked: what was acknowledged (202) and what
arrived, lost, duplicated, out of order.

Redis replicates asynchronously: an event the old master acknowledged in the instant before
it died may never reach the replica. Such events are absent from the new master's stream;
they are counted (and bounded) apart. Everything in the new master's stream must reach every
client exactly once, in stream order.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
import socketio

from tests.conftest import (
    SECRET,
    HubProcess,
    free_port,
    make_token,
    redis_server_binary,
    start_hub_process,
    stop_process,
)
from tests.helpers import THREAT, connected, recv_json, send_json

pytestmark = pytest.mark.slow

TYPE = "threat_detected"
SERVICE = "mymaster"
RATE_HZ = 40          # events per second, both instances together
BEFORE_S = 2.0        # publishing before the kill
AFTER_S = 3.0         # publishing after the sentinels announced the new master


@dataclass
class Sentinels:
    workdir: Path
    master_port: int
    replica_port: int
    sentinel_ports: list[int]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/0/{SERVICE}"

    def master_address(self) -> tuple[str, int] | None:
        """What the sentinels (the first that answers) call the master now."""
        for port in self.sentinel_ports:
            try:
                client = redis_sync.Redis(port=port, socket_timeout=1)
                host, master = client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "get-master-addr-by-name", SERVICE)
                client.close()
                return host.decode(), int(master)
            except (redis_sync.RedisError, TypeError, ValueError):
                continue
        return None


def _wait_ping(port: int, process: subprocess.Popen[bytes]) -> None:
    client = redis_sync.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis_sync.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis on {port} did not start") from None
            time.sleep(0.02)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    group = Sentinels(tmp_path, free_port(), free_port(), [free_port() for _ in range(3)])
    binary = redis_server_binary()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    try:
        for name, port, extra in (("master", group.master_port, []),
                                  ("replica", group.replica_port,
                                   ["--replicaof", "127.0.0.1", str(group.master_port)])):
            directory = tmp_path / name
            directory.mkdir()
            group.processes[name] = subprocess.Popen(
                [binary, "--port", str(port), "--dir", str(directory), *common, *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_ping(port, group.processes[name])
        replica = redis_sync.Redis(port=group.replica_port)
        deadline = time.monotonic() + 15
        while replica.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        replica.close()
        for index, port in enumerate(group.sentinel_ports):
            conf = tmp_path / f"sentinel-{index}.conf"  # sentinels rewrite their file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {group.master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            name = f"sentinel-{index}"
            group.processes[name] = subprocess.Popen(
                [binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_ping(port, group.processes[name])
        # Every sentinel knows the replica and the other sentinels before the test starts.
        deadline = time.monotonic() + 20
        while True:
            ready = 0
            for port in group.sentinel_ports:
                master = redis_sync.Redis(  # type: ignore[no-untyped-call]
                    port=port, decode_responses=True).execute_command("SENTINEL", "master",
                                                                      SERVICE)
                info = master if isinstance(master, dict) else dict(
                    zip(master[::2], master[1::2], strict=True))
                ready += int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2
            if ready == 3:
                break
            assert time.monotonic() < deadline, "the sentinels did not discover each other"
            time.sleep(0.1)
        yield group
    finally:
        for process in group.processes.values():
            process.kill()
            process.wait()


class Plain:
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.closed: int | None = None

    async def run(self, url: str) -> None:
        ws = await connected(url, make_token(self.name))
        await send_json(ws, {"action": "subscribe", "event_types": [TYPE]})
        while (await recv_json(ws))["type"] != "subscription_updated":
            pass
        self.ready.set()
        try:
            while True:
                message = await recv_json(ws, timeout=3600)
                if message["type"] == TYPE:
                    self.received.append(message)
        except Exception:
            self.closed = ws.close_code
            raise

    def start(self, url: str) -> asyncio.Task[None]:
        self.ready = asyncio.Event()
        return asyncio.create_task(self.run(url))


class Sio:
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.client = socketio.AsyncClient(reconnection=False)
        self.disconnects = 0
        self.client.on(TYPE, self._event)
        self.client.on("disconnect", self._disconnect)

    async def _event(self, envelope: dict[str, Any]) -> None:
        self.received.append(envelope)

    async def _disconnect(self, reason: Any = None) -> None:
        self.disconnects += 1

    async def connect(self, url: str) -> None:
        await self.client.connect(url, auth={"token": make_token(self.name),
                                             "event_types": [TYPE]},
                                  transports=["websocket"], wait_timeout=10)


def stream_ids(client: redis_sync.Redis, stream: str) -> list[str]:
    """Event ids in stream order (an event appended after an outage at a later position
    keeps its id in field ``i``; health markers carry no event)."""
    entries: list[tuple[str, dict[str, str]]] = client.xrange(stream)  # type: ignore[assignment]
    return [fields.get("i", entry) for entry, fields in entries if "e" in fields]


def score(received: list[dict[str, Any]], expected: list[str],
          source: dict[str, tuple[str, float, float]]) -> dict[str, int]:
    """Lost / duplicated / out of order of ``received`` against the ids ``expected``.

    Order is what hub promises: publish order per publishing instance (``source``: id ->
    (instance, request sent, 202 received)). Requests in flight at once have no order among
    them, so an event is out of order when it arrives after one from the same instance whose
    request was sent only after its own 202 came back."""
    ids = [m["id"] for m in received]
    latest_sent: dict[str, float] = {}
    out_of_order = 0
    for event_id in ids:
        if event_id in source:
            instance, sent, acked = source[event_id]
            out_of_order += acked < latest_sent.get(instance, -1.0)
            latest_sent[instance] = max(sent, latest_sent.get(instance, -1.0))
    return {
        "received": len(ids),
        "lost": len(set(expected) - set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "out_of_order": out_of_order,
        "foreign": len(set(ids) - set(expected)),
    }


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_sentinel_failover_under_load(sentinels: Sentinels, tmp_path: Path,
                                            fault: str) -> None:
    """``kill``: SIGKILL, the master's sockets are reset at once; ``freeze``: SIGSTOP, its
    sockets stay open and silent (a host that vanished, a partition) until the end."""
    unique = uuid.uuid4().hex[:8]
    stream = f"hub:sentinel:{unique}"
    env = {"REDIS_URL": sentinels.url, "JWT_SECRET": SECRET, "HUB_STREAM_KEY": stream,
           "HUB_SOCKETIO_CHANNEL": f"socketio-{unique}", "HUB_JSON_LOGS": "0",
           "HUB_JOURNAL_DIR": str(tmp_path / "journal")}
    hubs: list[HubProcess] = []
    try:
        for name in ("a", "b"):
            hubs.append(start_hub_process({**env, "HUB_INSTANCE_ID": f"sentinel-{name}"},
                                          tmp_path=tmp_path))
        await _run(sentinels, hubs, stream, fault)
    finally:
        for hub in hubs:
            stop_process(hub.process)


async def _run(sentinels: Sentinels, hubs: list[HubProcess], stream: str,
               fault: str) -> None:
    plains = [Plain(f"plain-{n}") for n in range(len(hubs))]
    tasks = [p.start(h.url.replace("http", "ws") + "/ws/events") for p, h in zip(plains, hubs,
                                                                                strict=True)]
    for plain in plains:
        await asyncio.wait_for(plain.ready.wait(), 10)
    sios = [Sio(f"sio-{n}") for n in range(len(hubs))]
    for sio, hub in zip(sios, hubs, strict=True):
        await sio.connect(hub.url)

    admin = {"Authorization": f"Bearer {make_token('ops', 'admin')}"}
    published: list[tuple[int, str, int, str]] = []  # (seq, instance, status, id)
    timing: dict[int, tuple[float, float]] = {}  # seq -> (request sent, answer received)
    journalled: list[int] = []
    latency: list[float] = []
    killed_at = promoted_at = None
    async with httpx.AsyncClient(timeout=10) as http:
        async def post(seq: int) -> None:
            hub = hubs[seq % len(hubs)]
            began = time.monotonic()
            try:
                response = await http.post(f"{hub.url}/events", headers=admin,
                                           json={"type": TYPE, "data": {**THREAT, "seq": seq}})
                latency.append(time.monotonic() - began)
                timing[seq] = (began, time.monotonic())
                body = response.json() if response.status_code == 202 else {}
                event_id = body.get("id", "")
                if body.get("durable") is False:
                    journalled.append(seq)
                published.append((seq, hub.url, response.status_code, event_id))
            except httpx.HTTPError as exc:
                published.append((seq, hub.url, -1, type(exc).__name__))

        posts: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for seq in itertools.count():
            # A steady rate: each request starts on its tick, whatever the others take.
            await asyncio.sleep(max(0.0, start + seq / RATE_HZ - time.monotonic()))
            posts.append(asyncio.create_task(post(seq)))
            now = time.monotonic()
            if killed_at is None and now - start >= BEFORE_S:
                if fault == "kill":
                    sentinels.processes["master"].kill()
                    sentinels.processes["master"].wait()
                else:
                    sentinels.processes["master"].send_signal(signal.SIGSTOP)
                killed_at = now
            if killed_at is not None and promoted_at is None:
                address = sentinels.master_address()
                if address is not None and address[1] == sentinels.replica_port:
                    promoted_at = now
            if promoted_at is not None and now - promoted_at >= AFTER_S:
                break
            assert killed_at is None or now - killed_at < 30, "no failover within 30 s"
        await asyncio.gather(*posts)

    assert killed_at is not None and promoted_at is not None
    acked = [p for p in sorted(published) if p[2] == 202]
    refused = [p for p in published if p[2] != 202]
    acked_ids = [p[3] for p in acked]
    # What the new master holds: the acknowledged events that survived the failover.
    new_master = redis_sync.Redis(port=sentinels.replica_port, decode_responses=True)
    deadline = time.monotonic() + 30
    while True:  # journaled events reach the new master as the instances flush them
        in_stream = set(stream_ids(new_master, stream))
        missing = [i for i in acked_ids if i not in in_stream]
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    stream_order = stream_ids(new_master, stream)
    new_master.close()
    expected = [i for i in stream_order if i in set(acked_ids)]
    source = {p[3]: (p[1], *timing[p[0]]) for p in acked}
    # Across instances, the stream order (what a client on a third instance would see).
    position = {event_id: n for n, event_id in enumerate(expected)}
    clients: list[Any] = [*plains, *sios]
    deadline = time.monotonic() + 30
    while any(score(c.received, expected, source)["lost"] for c in clients):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)

    # Both instances are on the new master: their health (write path, read path, round
    # trip of a marker through the stream) says healthy again.
    health: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        deadline = time.monotonic() + 30
        while True:
            health = {h.url: (await http.get(f"{h.url}/ws/health")).json() for h in hubs}
            if all(v["status"] == "healthy" for v in health.values()):
                break
            assert time.monotonic() < deadline, f"not healthy after the failover: {health}"
            await asyncio.sleep(0.2)

    figures = {c.name: score(c.received, expected, source) for c in clients}
    for client in clients:  # reported, not promised: events landing late after an outage
        seen = [position[m["id"]] for m in client.received if m["id"] in position]
        figures[client.name]["late"] = sum(1 for a, b in itertools.pairwise(seen) if b < a)
    report = (f"{fault}: published {len(published)} at {RATE_HZ}/s, acknowledged {len(acked)}, "
              f"refused {len(refused)} {sorted({p[2] for p in refused})}, journalled "
              f"{len(journalled)}, slowest 202 {max(latency):.2f} s; "
              f"failover {promoted_at - killed_at:.1f} s; acknowledged but not in the new "
              f"master (async replication) {len(missing)}; per client {figures}")
    print("\nFAILOVER", report)
    for hub in hubs:
        assert hub.process.poll() is None, hub.log()
    assert all(c.closed is None for c in plains) and all(s.disconnects == 0 for s in sios), \
        report
    # Every acknowledged event the new master holds reached every client once, in order.
    for name, figure in figures.items():
        assert figure["lost"] == 0 and figure["duplicated"] == 0, (name, report)
        assert figure["out_of_order"] == 0 and figure["foreign"] == 0, (name, report)
    # What async replication may lose is the instant before the kill: a few events at most.
    assert len(missing) <= 3, report
    for task in tasks:
        task.cancel()
    for sio in sios:
        await sio.client.disconnect()
