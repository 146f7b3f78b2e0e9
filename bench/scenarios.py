"""The scenarios of issue 4, each run against one target on fresh server instances.

Every scenario follows one shape: start the server(s), connect the load client, sample the
server's CPU (utime+stime from /proc), publish through the target's native path, wait for the
load client to see every event (or stall), sample the CPU again. CPU per delivered event is
the server processes' CPU over the measured phase divided by the deliveries counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.procs import (
    BenchError,
    Proc,
    connections_per_process,
    cpu_seconds,
    machine_busy_seconds,
    rss_bytes,
    write_syscalls,
)
from bench.publishers import Publisher, event_data
from bench.revocation import revocation
from bench.targets import BENCH, Target

SUBSCRIBE = "threat_detected"


@dataclass
class Sizes:
    burst_clients: int = 1000
    burst_events: int = 500
    steady_clients: int = 1000
    steady_rate: float = 5.0
    steady_seconds: float = 20.0
    capacity: tuple[int, ...] = (1000, 10000)
    cross_clients: int = 1000
    cross_events: int = 200
    settle_s: float = 3.0
    grace_ms: int = 10000
    multicore_clients: int = 1000
    multicore_rate: float = 25.0
    multicore_seconds: float = 20.0
    revocation_connections: int = 300  # of each transport
    revocation_rounds: int = 3
    # One instance holding this many connections at once (the machine's descriptor limit
    # is 20,000: the server and the load client each hold one per connection).
    concurrent_clients: int = 15000
    concurrent_events: int = 1

    @classmethod
    def quick(cls) -> Sizes:
        # grace: a run ends as soon as everything arrived; the 20 s only bound how long a
        # stall on a loaded machine may last before the smoke test calls it lost.
        return cls(20, 20, 20, 5.0, 2.0, (20, 50), 20, 20, 0.5, 20000, 20, 5.0, 2.0, 5, 1,
                   50, 1)


@dataclass
class Env:
    redis: Proc
    secret: str
    user_token: str
    admin_token: str
    logdir: Path

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}"


class LoadClient:
    """The Node load client driven over stdio (see loadclient.js)."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_log: Path) -> None:
        self.proc = proc
        self.stderr_log = stderr_log

    @classmethod
    async def start(
        cls,
        target: Target,
        urls: list[str],
        clients: int,
        events: int,
        env: Env,
        run: str,
        subscribe: str,
        grace_ms: int,
        logdir: Path,
    ) -> LoadClient:
        argv = [
            "node",
            "--max-old-space-size=4096",
            str(BENCH / "loadclient.js"),
            "--proto",
            target.proto,
            "--url",
            ",".join(urls),
            "--clients",
            str(clients),
            "--events",
            str(events),
            "--token",
            env.user_token,
            "--run",
            run,
            "--grace",
            str(grace_ms),
            "--batch",
            "64",
        ]
        if subscribe:
            argv += ["--subscribe", subscribe]
        stderr_log = logdir / f"loadclient-{target.name}-{run}.err"
        err = stderr_log.open("wb")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "BENCH_JWT_SECRET": env.secret},
            stderr=err,
            limit=1 << 20,
        )
        err.close()
        return cls(proc, stderr_log)

    async def read(self, phase: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise BenchError(
                    f"load client exited (rc={await self.proc.wait()}) waiting for "
                    f"{phase}: {self.stderr_log.read_text(errors='replace')[-800:]}"
                )
            msg: dict[str, Any] = json.loads(line)
            if msg.get("phase") == phase:
                return msg

    async def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd}) + "\n").encode())
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.send("exit")
                await asyncio.wait_for(self.proc.wait(), 10)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                self.proc.kill()
                await self.proc.wait()


def _ws_url(p: Proc) -> str:
    return f"ws://127.0.0.1:{p.port}"


async def _deliver(
    target: Target,
    env: Env,
    servers: list[Proc],
    clients: int,
    events: int,
    rate: float | None,
    sizes: Sizes,
    probe: Callable[[list[Proc]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Connect, publish `events` (as fast as possible, or at `rate`/s), measure.

    ``probe`` runs once every client is connected, before publishing; what it returns is
    added to the result."""
    run = secrets.token_hex(4)
    lc = await LoadClient.start(
        target,
        [_ws_url(p) for p in servers],
        clients,
        events,
        env,
        run,
        SUBSCRIBE,
        sizes.grace_ms,
        env.logdir,
    )
    pub: Publisher = target.publisher(servers[0], env.redis_url, env.admin_token)
    try:
        ready = await lc.read("ready", timeout=900)
        probed = probe(servers) if probe else {}
        await pub.start()
        pids = [p.pid for p in servers]
        await asyncio.sleep(0.5)  # let connect-time work (and GC of it) finish before sampling
        lpid = [lc.proc.pid]
        mine = [os.getpid()]  # its process tree: every server, Redis and load client of the run
        busy0, mine0 = machine_busy_seconds(), cpu_seconds(mine)
        cpu0, rcpu0, lcpu0 = cpu_seconds(pids), cpu_seconds([env.redis.pid]), cpu_seconds(lpid)
        t0 = time.monotonic()
        for seq in range(events):
            if rate:
                delay = t0 + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await pub.publish(SUBSCRIBE, event_data(run, seq))
        await pub.flush()
        publish_s = time.monotonic() - t0
        await lc.send("done")
        res = await lc.read("result", timeout=sizes.grace_ms / 1000 + 600)
        cpu1, rcpu1, lcpu1 = cpu_seconds(pids), cpu_seconds([env.redis.pid]), cpu_seconds(lpid)
        busy1, mine1 = machine_busy_seconds(), cpu_seconds(mine)
        t1 = time.monotonic()
        rss = rss_bytes(pids)
    finally:
        await pub.close()
        await lc.close()
    cpu = cpu1 - cpu0
    delivered = res["delivered"]
    return {
        "clients": clients,
        "events": events,
        "instances": len(servers),
        "publisher": pub.name,
        "publish_errors": getattr(pub, "errors", []),
        "connected": ready["connected"],
        "failed_connects": ready["failed_connects"],
        "connect_s": ready["connect_s"],
        "connect_errors": ready["errors"],
        "publish_s": publish_s,
        "measured_s": t1 - t0,
        "server_cpu_s": cpu,
        "redis_cpu_s": rcpu1 - rcpu0,
        # The load client must not be the bottleneck: this stays well under 100 when it is not.
        "loadclient_cpu_pct": 100 * (lcpu1 - lcpu0) / (t1 - t0),
        # CPU used on the machine by anything that is not part of this run (other jobs);
        # when it is high, latency and throughput are not trustworthy (CPU/delivery mostly is).
        "other_cpu_pct": max(0.0, 100 * ((busy1 - busy0) - (mine1 - mine0)) / (t1 - t0)),
        "cpu_us_per_delivery": cpu / delivered * 1e6 if delivered else None,
        "server_cpu_pct": 100 * cpu / (t1 - t0),
        "rss_mb_after": rss / 2**20,
        **{
            k: res[k]
            for k in (
                "expected",
                "delivered",
                "missing",
                "duplicates",
                "foreign",
                "out_of_order",
                "closed_during_run",
                "close_codes",
                "deliveries_per_s",
                "latency_ms",
                "complete",
            )
        },
        **probed,
    }


async def _with_servers(
    target: Target, env: Env, n: int, tag: str, fn: Any, max_clients: int = 0
) -> dict[str, Any]:
    servers: list[Proc] = []
    try:
        for i in range(n):
            servers.append(
                target.start(env.redis_url, env.secret, env.logdir, f"{tag}{i}", max_clients)
            )
        result: dict[str, Any] = await fn(servers)
        for s in servers:
            if s.popen.poll() is not None:
                raise BenchError(f"{s.name} died during the run: {s.tail()}")
        return result
    finally:
        for s in servers:
            s.stop()


async def _fan_out(
    target: Target,
    env: Env,
    sizes: Sizes,
    tag: str,
    instances: int,
    clients: int,
    events: int,
    rate: float | None = None,
) -> dict[str, Any]:
    """One delivery scenario: ``instances`` servers, ``clients`` split over them."""
    def run(servers: list[Proc]) -> Awaitable[dict[str, Any]]:
        return _deliver(target, env, servers, clients, events, rate, sizes)

    return await _with_servers(target, env, instances, tag, run)


async def burst(target: Target, env: Env, sizes: Sizes) -> dict[str, Any]:
    return await _fan_out(target, env, sizes, "burst", 1, sizes.burst_clients, sizes.burst_events)


async def steady(target: Target, env: Env, sizes: Sizes) -> dict[str, Any]:
    events = max(1, round(sizes.steady_rate * sizes.steady_seconds))
    r = await _fan_out(
        target, env, sizes, "steady", 1, sizes.steady_clients, events, sizes.steady_rate
    )
    r["rate_events_per_s"] = sizes.steady_rate
    return r


async def cross(target: Target, env: Env, sizes: Sizes) -> dict[str, Any]:
    return await _fan_out(target, env, sizes, "cross", 2, sizes.cross_clients, sizes.cross_events)


async def _capacity_one(
    target: Target, env: Env, servers: list[Proc], n: int, sizes: Sizes
) -> dict[str, Any]:
    pids = [p.pid for p in servers]
    urls = [_ws_url(p) for p in servers]
    # Warm up: the first connections load code and fill caches; keep that out of the delta.
    warm = await LoadClient.start(target, urls, 10, 1, env, "warm", "", 1000, env.logdir)
    await warm.read("ready", timeout=60)
    await warm.close()
    await asyncio.sleep(sizes.settle_s)
    rss0 = rss_bytes(pids)
    lc = await LoadClient.start(target, urls, n, 1, env, secrets.token_hex(4), "", 1000, env.logdir)
    try:
        ready = await lc.read("ready", timeout=900)
        await asyncio.sleep(sizes.settle_s)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        await asyncio.sleep(sizes.settle_s)
        cpu1, t1 = cpu_seconds(pids), time.monotonic()
        rss1 = rss_bytes(pids)
        await lc.send("status")
        status = await lc.read("status", timeout=30)
    finally:
        await lc.close()
    connected = ready["connected"]
    return {
        "clients": n,
        "connected": connected,
        "failed_connects": ready["failed_connects"],
        "connect_errors": ready["errors"],
        "connect_s": ready["connect_s"],
        "connects_per_s": connected / ready["connect_s"] if ready["connect_s"] else None,
        "still_open": status["open"],
        "rss_mb_before": rss0 / 2**20,
        "rss_mb_after": rss1 / 2**20,
        "rss_kib_per_conn": (rss1 - rss0) / 1024 / connected if connected else None,
        "idle_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "complete": connected == n and status["open"] == n,
    }


async def capacity(target: Target, env: Env, sizes: Sizes) -> list[dict[str, Any]]:
    out = []
    for n in sizes.capacity:
        out.append(
            await _with_servers(
                target, env, 1, f"cap{n}", lambda s, n=n: _capacity_one(target, env, s, n, sizes)
            )
        )
    return out


def _spread(servers: list[Proc]) -> dict[str, Any]:
    """Which process holds how many of the clients (the kernel's view, per worker PID)."""
    counts: dict[int, int] = {}
    for s in servers:
        counts |= connections_per_process([s.pid], s.port)
    total = sum(counts.values())
    shares = sorted((100 * n / total for n in counts.values()), reverse=True) if total else []
    return {
        "worker_clients": sorted(counts.values(), reverse=True),
        "worker_share_pct": shares,
    }


async def multicore(target: Target, env: Env, sizes: Sizes) -> list[dict[str, Any]]:
    """One process against two on one machine, the same steady load (issue 16, part 2).

    hub: ``hub serve`` against ``hub serve --workers 2`` (one port; the kernel picks the
    worker of each connection). The peers have no shared-port mode without a sticky
    balancer in front (socket.io's cluster adapter needs @socket.io/sticky), so they run
    as two processes on one Redis with the load client splitting the clients between them.
    The same events at the same rate reach the same clients in both rows, so CPU per
    delivery compares what a second process costs; each process's share of the clients
    is counted from /proc.
    """
    events = max(1, round(sizes.multicore_rate * sizes.multicore_seconds))
    rows = []
    for n in (1, 2):
        hub_workers = target.kind == "hub" and n > 1
        t = replace(target, workers=n) if hub_workers else target
        instances = 1 if target.kind == "hub" else n

        async def run(servers: list[Proc], t: Target = t) -> dict[str, Any]:
            writes: list[int] = []

            def probe(servers: list[Proc]) -> dict[str, Any]:
                writes.append(write_syscalls([s.pid for s in servers]))
                return _spread(servers)

            r = await _deliver(
                t, env, servers, sizes.multicore_clients, events, sizes.multicore_rate, sizes,
                probe=probe,
            )
            # Deliveries per write: how many events each client write carried on average
            # (more when a server fell behind and joined what queued): CPU per delivery
            # compares fairly only between rows that joined about as much.
            made = write_syscalls([s.pid for s in servers]) - writes[0]
            r["write_syscalls"] = made
            r["deliveries_per_write"] = r["delivered"] / made if made > 0 else None
            return r

        r = await _with_servers(t, env, instances, f"multicore{n}-", run)
        r |= {
            "processes": n,
            "layout": (
                f"hub serve --workers {n}" if hub_workers
                else "hub serve" if target.kind == "hub"
                else "1 process" if n == 1
                else f"{n} processes, clients split by the load client"
            ),
            "rate_events_per_s": sizes.multicore_rate,
        }
        rows.append(r)
    one, two = rows
    if one.get("cpu_us_per_delivery") and two.get("cpu_us_per_delivery"):
        two["cpu_vs_one_process"] = two["cpu_us_per_delivery"] / one["cpu_us_per_delivery"]
    shares = two["worker_share_pct"]
    two["spread_even"] = len(shares) == 2 and all(40 <= s <= 60 for s in shares)
    return rows


async def concurrent(target: Target, env: Env, sizes: Sizes) -> dict[str, Any]:
    """``concurrent_clients`` connections open at once on one instance, every one
    subscribed, and one event that must reach each of them; resident memory with all open."""
    n = sizes.concurrent_clients

    async def run(servers: list[Proc]) -> dict[str, Any]:
        rss0 = rss_bytes([p.pid for p in servers])
        r = await _deliver(target, env, servers, n, sizes.concurrent_events, None, sizes)
        r["rss_mb_before"] = rss0 / 2**20
        r["rss_kib_per_conn"] = (
            (r["rss_mb_after"] * 2**20 - rss0) / 1024 / r["connected"] if r["connected"] else None
        )
        return r

    return await _with_servers(target, env, 1, "conc", run, max_clients=n + 100)


SCENARIOS = {
    "burst": burst,
    "steady": steady,
    "capacity": capacity,
    "cross": cross,
    "multicore": multicore,
    "revocation": revocation,
    "concurrent": concurrent,
}
