"""What Redis carries: one node against a cluster of three shards (issue 16, part 3).

``python -m bench.shards [--seconds 5] [--concurrency 64] [--instances 2] [--configs …]``

Each configuration runs hub's own Redis backend (the one ``hub serve`` runs, in this
process: ``--instances`` of them, each with its reader, merge and journal) publishing as
fast as ``--concurrency`` concurrent publishes per instance go, for ``--seconds``:

- ``single``: ``redis://`` on one ``redis-server``;
- ``replica``: the same with a replica attached (``--replicaof``), appends not waiting;
- ``replica-wait``: the same, ``?wait_replicas=1``: each append confirmed by ``WAIT`` on the
  replica (what ``redis+sentinel://`` does by default): the cost of that round trip;
- ``cluster-1``: ``redis+cluster://`` with one shard (three masters, one replica each, an
  append confirmed by ``WAIT`` on the replica): what sharding's machinery costs;
- ``cluster-3``: the same cluster with three shards (one type per shard).

Measured: events acknowledged per second, every instance delivering every one (checked),
the Redis CPU (utime+stime from ``/proc``) each master node spent per event it carried,
and each publish's latency (median, 99th percentile). On this 2-core machine the Python
side (publishers and readers, one process) is the bottleneck, not Redis, so events/s here
is not what a node can carry; the ceiling a node implies is 1 s of its CPU divided by its
CPU per event, and with three shards each master carries a third of the events. Results
go to ``bench/results/shards.json`` (or ``--out``; the rows of the configurations run,
``--configs a,b``, replaced, the others kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from hub.dispatch.cluster import ShardedBackend, open_cluster, shard_of
from hub.dispatch.redis import RedisBackend, journal_for, open_redis, wait_options
from hub.events import Event
from tests.conftest import RedisClusterNodes, RedisServer, make_settings, start_with_replica
from tests.helpers import wait_until

TYPES = ["load_c", "load_b", "load_a"]  # one per shard of three
RESULTS = Path(__file__).resolve().parent / "results" / "shards.json"
CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def backend_for(url: str, stream: str) -> Any:
    settings = make_settings(redis_url=url, stream_key=stream, legacy_channel="",
                             extra_event_types=tuple(TYPES))
    if url.startswith("redis+cluster://"):
        return ShardedBackend.build(open_cluster(url), settings, url,
                                    legacy_parser=lambda raw: None)
    client = open_redis(url)
    return RedisBackend(client, owns_client=True, stream_key=stream,
                        history_size=settings.history_size, legacy_channel="",
                        legacy_parser=lambda raw: None, instance_id=settings.instance_id,
                        journal=journal_for(settings, client), **wait_options(url)[1])


async def run(name: str, url: str, pids: dict[int, int], types: list[str], args: Any
              ) -> dict[str, Any]:
    stream = f"bench:shards:{uuid.uuid4().hex[:8]}"
    instances = [backend_for(url, stream) for _ in range(args.instances)]
    delivered: list[set[str]] = [set() for _ in instances]
    for backend, seen in zip(instances, delivered, strict=True):
        def on_event(event: Event, seen: set[str] = seen) -> None:
            seen.add(event.id)
        await backend.start(on_event)
    acked: list[str] = []
    latency: list[float] = []
    journalled = 0
    stop = time.monotonic() + args.seconds

    async def publisher(backend: Any, n: int) -> None:
        nonlocal journalled
        while time.monotonic() < stop:
            sent = time.monotonic()
            event = await backend.publish(types[n % len(types)], "2026-01-01T00:00:00.000Z",
                                          {"n": n})
            latency.append(time.monotonic() - sent)
            acked.append(event.id)
            journalled += not event.shared
            n += len(types)

    before = {port: cpu_s(pid) for port, pid in pids.items()}
    began = time.monotonic()
    await asyncio.gather(*(publisher(b, i) for b in instances
                           for i in range(args.concurrency)))
    elapsed = time.monotonic() - began
    with contextlib.suppress(AssertionError):  # "complete" says whether they all came
        await wait_until(lambda: all(len(seen) >= len(acked) for seen in delivered), 30)
    carried = time.monotonic() - began
    after = {port: cpu_s(pid) for port, pid in pids.items()}
    probes = sum(getattr(b, "probes", 0) for b in instances)
    for backend in instances:
        # Bounded: cancelling a reader blocked in XREAD has been seen to hang here (a
        # cancellation redis-py's connection swallows); the figures are taken already.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(backend.stop(), 5)
    expected = set(acked)
    busy = {port: after[port] - before[port] for port in pids}
    # Per event each node carried: a shard's events (all of them on one node).
    per_node = len(acked) / max(1, len(types)) if name != "single" else len(acked)
    masters = sorted(busy, key=busy.__getitem__, reverse=True)[:max(1, len(types))]
    us = [round(1e6 * busy[p] / per_node, 1) for p in masters]
    return {"config": name, "shards": len(types), "instances": args.instances,
            "concurrency": args.concurrency, "acked": len(acked),
            "events_per_s": round(len(acked) / elapsed),
            "delivered_per_s_per_instance": round(len(acked) / carried),
            "complete": all(seen >= expected for seen in delivered),
            "journalled": journalled, "watermarks_per_event": round(probes / len(acked), 3),
            "publish_ms_p50": round(1000 * statistics.median(latency), 2),
            "publish_ms_p99": round(1000 * statistics.quantiles(latency, n=100)[98], 2),
            "redis_cpu_s": {str(p): round(busy[p], 2) for p in sorted(busy)},
            "busiest_node_us_per_event": max(us),
            "node_ceiling_events_per_s": round(1e6 / max(us)),
            "deployment_ceiling_events_per_s": round(len(types) * 1e6 / max(us))
            if name != "single" else round(1e6 / max(us))}


CONFIGS = ("single", "replica", "replica-wait", "cluster-1", "cluster-3")


async def main(args: Any) -> list[dict[str, Any]]:
    rows = []
    configs = args.configs.split(",")
    if "single" in configs:
        single = RedisServer()
        single.start()
        try:
            assert single.process is not None
            rows.append(await run("single", single.url, {single.port: single.process.pid},
                                  ["load_a"], args))
        finally:
            single.stop()
    if {"replica", "replica-wait"} & set(configs):
        master, replica = start_with_replica()
        try:
            assert master.process is not None and replica.process is not None
            pids = {master.port: master.process.pid, replica.port: replica.process.pid}
            url = f"redis://127.0.0.1:{master.port}/0"
            for name, query in (("replica", ""), ("replica-wait", "?wait_replicas=1")):
                if name in configs:
                    rows.append(await run(name, url + query, pids, ["load_a"], args))
        finally:
            replica.stop()
            master.stop()
    if {"cluster-1", "cluster-3"} & set(configs):
        cluster = RedisClusterNodes(masters=3, replicas=1)
        try:
            cluster.start()
            pids = {port: p.pid for port, p in cluster.processes.items()}
            url = cluster.url
            one = [t for t in TYPES if shard_of(t, 1) == 0]
            if "cluster-1" in configs:
                rows.append(await run("cluster-1", url + "?shards=1", pids, one[:1], args))
            if "cluster-3" in configs:
                rows.append(await run("cluster-3", url, pids, TYPES, args))
        finally:
            cluster.stop()
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file")
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(sorted(unknown))}")
    rows = asyncio.run(main(args))
    out: Path = args.out
    out.parent.mkdir(exist_ok=True)
    ran = {row["config"] for row in rows}
    kept = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([r for r in kept if r["config"] not in ran] + rows,
                              indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    cli()
