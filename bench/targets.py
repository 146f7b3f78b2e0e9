"""What the bench runs against: hub on both transports and the two peers.

A target knows how to start one server instance on a Redis, which wire protocol the load
client speaks to it, and which publisher is its native path.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Proc, free_port, spawn, wait_http_ok, wait_workers
from bench.publishers import HttpPublisher, HubPublisher, Publisher, hub_publisher_available

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass(frozen=True)
class Target:
    name: str
    proto: str  # "plain" (hub's /ws/events) or "sio" (Engine.IO 4 / Socket.IO 5)
    kind: str  # "node" | "pysio" | "hub"
    description: str
    # hub only: `hub serve --workers N` (N processes on one port); the multicore scenario
    # runs a copy of the hub targets with workers=2.
    workers: int = 1

    def start(
        self, redis_url: str, secret: str, logdir: Path, tag: str, max_clients: int = 0
    ) -> Proc:
        port = free_port()
        env = {"JWT_SECRET": secret, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
        if max_clients and self.kind == "hub":
            # hub caps connections per instance (HUB_MAX_CONNECTIONS, 10,000 by default).
            env["HUB_MAX_CONNECTIONS"] = str(max_clients)
        log = logdir / f"{self.name}-{tag}.log"
        if self.kind == "node":
            argv = ["node", str(BENCH / "peers" / "node-socketio.js")]
            env |= {"PORT": str(port), "HOST": "127.0.0.1", "NODE_ENV": "production"}
            health = f"http://127.0.0.1:{port}/health"
        elif self.kind == "pysio":
            argv = [
                sys.executable,
                "-m",
                "bench.peers.pysio_baseline",
                "--port",
                str(port),
                "--redis-url",
                redis_url,
            ]
            health = f"http://127.0.0.1:{port}/health"
        else:
            argv = [
                sys.executable,
                "-m",
                "hub",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--redis-url",
                redis_url,
            ]
            if self.workers > 1:
                argv += ["--workers", str(self.workers)]
            health = f"http://127.0.0.1:{port}/ws/health"
        proc = spawn(self.name, argv, log, env=env, cwd=ROOT, port=port)
        try:
            wait_http_ok(health, proc.popen, timeout=30)
            if self.workers > 1:
                wait_workers(health, proc.popen, self.workers, timeout=30)
        except Exception:
            proc.stop()
            raise
        return proc

    def publisher(self, proc: Proc, redis_url: str, admin_token: str) -> Publisher:
        if self.kind == "hub":
            if hub_publisher_available():
                return HubPublisher(redis_url)
            return HttpPublisher("127.0.0.1", proc.port, "/events", token=admin_token)
        return HttpPublisher("127.0.0.1", proc.port, "/publish")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("node", "sio", "node", "Node socket.io 4 + @socket.io/redis-adapter"),
        Target(
            "pysio", "sio", "pysio", "python-socketio AsyncServer + AsyncRedisManager (uvicorn)"
        ),
        Target("hub-ws", "plain", "hub", "hub, plain /ws/events"),
        Target("hub-sio", "sio", "hub", "hub, Socket.IO /socket.io/"),
    )
}


def hub_available() -> bool:
    return importlib.util.find_spec("hub") is not None and (ROOT / "hub" / "__main__.py").exists()


def node_modules_ok() -> bool:
    return all(
        (BENCH / "node_modules" / p).is_dir()
        for p in ("ws", "socket.io", "@socket.io/redis-adapter", "redis", "jsonwebtoken")
    )
