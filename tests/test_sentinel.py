"""Sentinel failover under load, with real processes.

A Redis master, one replica and three sentinels (``redis-server FILE --sentinel``) on free
ports; two ``hub serve`` instances on ``REDIS_URL=redis+sentinel://…``; plain WebSocket and
Socket.IO clients on both; events published at a steady rate through ``POST /events``,
alternating instances. The master is killed with SIGKILL mid-stream, the sentinels promote
the replica, and every client's stream is checked: what was acknowledged (202) and what
arrived, lost, duplicated, out of order.

Redis replicates asynchronously, so on ``redis+sentinel://`` an append waits for the replica
(``WAIT``, ``wait_replicas=1`` by default): an event the old master took but the replica did
not confirm is journalled and appended again, never acknowledged on the master alone while
it has a replica. So no acknowledged event may be absent from the new master's stream, and
everything in it must reach every client exactly once, in stream order.
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

import pytest
import redis as redis_sync

from tests import failover
from tests.conftest import HubProcess, free_port, redis_server_binary, wait_redis
from tests.helpers import THREAT

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
            wait_redis(port, group.processes[name])
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
            wait_redis(port, group.processes[name])
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


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_sentinel_failover_under_load(sentinels: Sentinels, tmp_path: Path,
                                            fault: str) -> None:
    """``kill``: SIGKILL, the master's sockets are reset at once; ``freeze``: SIGSTOP, its
    sockets stay open and silent (a host that vanished, a partition) until the end."""
    unique = uuid.uuid4().hex[:8]
    stream = f"hub:sentinel:{unique}"
    env = failover.hub_env(sentinels.url, stream, unique, tmp_path)
    with failover.two_hubs(env, "sentinel", tmp_path) as hubs:
        await _run(sentinels, hubs, stream, fault)


async def _run(sentinels: Sentinels, hubs: list[HubProcess], stream: str,
               fault: str) -> None:
    clients = failover.Clients(hubs, [TYPE])
    await clients.connect()

    def apply_fault() -> None:
        if fault == "kill":
            sentinels.processes["master"].kill()
            sentinels.processes["master"].wait()
        else:
            sentinels.processes["master"].send_signal(signal.SIGSTOP)

    async def promoted(seq: int) -> bool:
        address = sentinels.master_address()
        return address is not None and address[1] == sentinels.replica_port

    load = failover.SteadyLoad(hubs, RATE_HZ, lambda seq: (TYPE, {**THREAT, "seq": seq}))
    await load.run(before_s=BEFORE_S, after_s=AFTER_S, fault=apply_fault, promoted=promoted)

    acked, refused = load.acked(), load.refused()
    acked_ids = [p[3] for p in acked]
    # What the new master holds: the acknowledged events that survived the failover.
    new_master = redis_sync.Redis(port=sentinels.replica_port, decode_responses=True)
    deadline = time.monotonic() + 30
    while True:  # journaled events reach the new master as the instances flush them
        in_stream = set(failover.stream_ids(new_master, stream))
        missing = [i for i in acked_ids if i not in in_stream]
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    stream_order = failover.stream_ids(new_master, stream)
    # The default on redis+sentinel://: appends wait for a replica (the new master has none
    # yet, so its WAITs ask for none).
    assert "cmdstat_wait" in new_master.info("commandstats")
    new_master.close()
    expected = [i for i in stream_order if i in set(acked_ids)]
    source = load.source()
    # Across instances, the stream order (what a client on a third instance would see).
    position = {event_id: n for n, event_id in enumerate(expected)}
    await failover.settle(clients, expected, source)
    await failover.wait_healthy(hubs)

    figures = {c.name: failover.tally(c.received, expected, source) for c in clients.all}
    for client in clients.all:  # reported, not promised: events landing late after an outage
        seen = [position[m["id"]] for m in client.received if m["id"] in position]
        figures[client.name]["late"] = sum(1 for a, b in itertools.pairwise(seen) if b < a)
    report = (f"{fault}: published {len(load.published)} at {RATE_HZ}/s, acknowledged "
              f"{len(acked)}, refused {len(refused)} {sorted({p[2] for p in refused})}, "
              f"journalled {len(load.journalled)}, slowest 202 {max(load.latency):.2f} s; "
              f"failover {load.failover_s:.1f} s; acknowledged but not in the new "
              f"master {len(missing)}; per client {figures}")
    print("\nFAILOVER", report)
    # Every acknowledged event the new master holds reached every client once, in order.
    failover.assert_delivered(hubs, clients, figures, report)
    # Acknowledged means confirmed by the replica: the new master has every one.
    assert len(missing) == 0, (missing, report)
    await clients.close()
