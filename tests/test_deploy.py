"""docker/ proven without a container engine: the compose topology as real processes.

Redis, one ``hub serve`` process per hub service of ``docker/docker-compose.yml`` (with the
command and environment that file gives it) and nginx running ``docker/nginx.conf``, with
the compose service names rendered to local ports. The settings come from the compose file
itself, so the two cannot drift apart.

nginx is Debian's package (``apt-get install -y nginx``); without it these tests fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import socketio
import yaml
from websockets.asyncio.client import ClientConnection

from tests.conftest import (
    ROOT,
    SECRET,
    HubProcess,
    RedisServer,
    free_port,
    make_token,
    start_hub_process,
    stop_process,
)
from tests.helpers import THREAT, close_code, recv_json, recv_type, send_json, ws_connect
from tests.sse_helpers import SseStream, sse_connect

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
NGINX_CONF = DOCKER / "nginx.conf"
TYPE = "threat_detected"

pytestmark = pytest.mark.timeout(90)


# -- the compose file ---------------------------------------------------------------------
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, ``$VAR`` and ``$$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        missing = not current if op in (":-", ":?") else current is None
        if op in (":?", "?") and missing:
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as fh:
        document = yaml.safe_load(fh)  # PyYAML resolves the x-hub anchor and `<<` merges
    assert isinstance(document, dict)
    return document


def hub_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run ``hub serve``: the hub replicas."""
    return {name: service for name, service in compose["services"].items()
            if list(service.get("command") or [])[:1] == ["serve"]}


def container_port(service: Mapping[str, Any]) -> int:
    command = list(service["command"])
    return int(command[command.index("--port") + 1])


def hub_args(service: Mapping[str, Any]) -> list[str]:
    """The compose command's ``hub serve`` flags, minus --host/--port (set per process)."""
    args, command = [], list(service["command"])[1:]
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg in ("--host", "--port"):
            skip = True
        else:
            args.append(arg)
    return args


def hub_environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    raw = service["environment"]
    assert isinstance(raw, dict), "hub environment must be a mapping"
    return {name: interpolate(str(value), env) for name, value in raw.items()}


def render_nginx(text: str, upstreams: Mapping[str, int], listen_port: int,
                 prefix: Path) -> str:
    """docker/nginx.conf for local processes: compose service hosts → 127.0.0.1 ports, the
    listen port → a free loopback port, temp files under ``prefix`` (as a non-root user
    nginx cannot write the packaged defaults)."""
    for host, port in upstreams.items():
        text, count = re.subn(rf"\b{re.escape(host)}:\d+\b", f"127.0.0.1:{port}", text)
        assert count, f"no upstream server {host} in nginx.conf"
    text, count = re.subn(r"(?m)^(\s*)listen\s+\d+\s*;", rf"\g<1>listen 127.0.0.1:{listen_port};",
                          text)
    assert count == 1, "nginx.conf must have exactly one `listen PORT;`"
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return text.replace("http {", "http {\n" + temp, 1)


# -- structure -----------------------------------------------------------------------------
def test_compose_file_structure() -> None:
    compose = load_compose()
    services = compose["services"]
    hubs = hub_services(compose)
    assert len(hubs) >= 2, "at least two hub replicas"
    assert {"redis", "nginx"} <= set(services)

    images = {str(s.get("image")) for s in hubs.values()}
    assert len(images) == 1, "every replica runs the same image"
    for name, hub in hubs.items():
        assert hub["build"]["dockerfile"] == "docker/Dockerfile", name
        assert (COMPOSE_FILE.parent / hub["build"]["context"] / "pyproject.toml").is_file()
        assert hub["stop_signal"] == "SIGTERM", name
        assert _seconds(hub["stop_grace_period"]) > 15, f"{name}: room for the drain"
        assert "ports" not in hub, f"{name}: replicas are reached through nginx only"
        assert hub["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert hub.get("hostname") == name, f"{name}: hostname names the instance"
        environment = hub["environment"]
        for key in ("REDIS_URL", "JWT_SECRET", "JWT_PUBLIC_KEY", "HUB_ALLOWED_ORIGINS"):
            assert key in environment, f"{name}: {key} is configurable"
        for key, value in environment.items():
            if re.search(r"SECRET|PASSWORD|KEY|TOKEN", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:?-?\}", str(value)), (
                    f"{name}: {key} must come from the environment, not the file")
        # With nothing set, the replicas use the bundled Redis.
        defaults = hub_environment(hub, {})
        assert defaults["REDIS_URL"] == "redis://redis:6379/0"
        assert defaults["JWT_SECRET"] == "", "no default secret"
    ports = {container_port(h) for h in hubs.values()}
    assert len(ports) == 1
    (port,) = ports

    nginx = services["nginx"]
    assert any(str(v).startswith("./nginx.conf:/etc/nginx/nginx.conf") for v in nginx["volumes"])
    assert set(nginx["depends_on"]) >= set(hubs)
    assert all(c["condition"] == "service_healthy" for c in nginx["depends_on"].values())
    published = [interpolate(str(p), {}) for p in nginx["ports"]]
    assert published == ["8000:8000"]
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"

    # Every hub replica is in both nginx upstreams and in Prometheus' targets.
    conf = NGINX_CONF.read_text()
    for upstream in ("hub", "hub_sticky"):
        block = re.search(rf"upstream {upstream} \{{(.*?)\}}", conf, re.S)
        assert block, f"upstream {upstream} missing"
        servers = set(re.findall(r"server\s+([\w.-]+):(\d+)", block.group(1)))
        assert servers == {(name, str(port)) for name in hubs}, upstream
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{name}:{container_port(h)}" for name, h in hubs.items())


def test_nginx_conf_routes() -> None:
    conf = NGINX_CONF.read_text()
    for location in ("location = /ws/events", "location /socket.io/",
                     "location = /events/stream"):
        body = conf.split(location, 1)[1].split("}", 1)[0]
        assert "proxy_read_timeout 3600s" in body, location
        assert "proxy_buffering off" in body, location
    assert "proxy_pass http://hub_sticky" in conf.split("location /socket.io/", 1)[1]
    assert re.search(r"hash \$remote_addr consistent", conf)
    directives = {" ".join(line.split()) for line in conf.splitlines()}
    for header in ("Upgrade $http_upgrade", "Connection $connection_upgrade",
                   "X-Forwarded-For $proxy_add_x_forwarded_for",
                   "X-Forwarded-Proto $scheme", "Host $http_host"):
        assert f"proxy_set_header {header};" in directives
    # Nothing a -g option sets may be in the file (nginx refuses duplicates).
    assert not re.search(r"(?m)^\s*(pid|daemon)\s", conf)


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"(?m)^FROM\s+(\S+)", text)
    assert all(s.startswith("python:") and s.split(" ")[0].endswith("-slim") for s in stages)
    users = re.findall(r"(?m)^USER\s+(\S+)", text)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"(?m)^STOPSIGNAL SIGTERM$", text)
    health = re.search(r"(?ms)^HEALTHCHECK .*?CMD (.*?)$", text)
    assert health and "http://127.0.0.1:8000/ws/health" in health.group(1)
    assert re.search(r"(?m)^EXPOSE 8000$", text)
    assert '"serve", "--host", "0.0.0.0", "--port", "8000"' in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"(?m)^COPY (?!--)(.+) \S+$", text):
        for path in copied.split():
            assert f"!{path}" in ignore, f"{path} is COPYed but excluded from the context"
            assert (ROOT / path).exists(), f"{path} is COPYed but missing from the repo"


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", str(value))
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


# -- the topology as processes ---------------------------------------------------------------
def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("nginx is required for tests/test_deploy.py: apt-get install -y nginx")
    return found


@dataclass
class Topology:
    redis: RedisServer
    hubs: dict[str, HubProcess]
    instance_ids: dict[str, str]
    nginx: subprocess.Popen[bytes]
    nginx_port: int
    workdir: Path
    stopped: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}/ws/events"

    def service_of(self, instance_id: str) -> str:
        return next(name for name, iid in self.instance_ids.items() if iid == instance_id)


def start_nginx(workdir: Path, upstreams: Mapping[str, int]) -> tuple[subprocess.Popen[bytes], int]:
    binary = nginx_binary()
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx(NGINX_CONF.read_text(), upstreams, port, prefix))
    directives = f"daemon off; pid {prefix / 'nginx.pid'}; error_log {prefix / 'error.log'} info;"
    if os.geteuid() == 0:
        directives += " user root;"  # workers as root can use the private temp dirs
    log = (prefix / "stdout.log").open("wb")
    process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-g", directives],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/nginx-health", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            errors = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
            raise RuntimeError(f"nginx did not start:\n{errors}")
        time.sleep(0.05)


@pytest.fixture
def topology(own_redis: RedisServer, tmp_path: Path) -> Iterator[Topology]:
    compose = load_compose()
    hubs = hub_services(compose)
    # The variables an operator would export; compose fills in the rest from its defaults.
    env = {"JWT_SECRET": SECRET, "REDIS_URL": own_redis.url}
    processes: dict[str, HubProcess] = {}
    instance_ids: dict[str, str] = {}
    try:
        ports = {name: free_port() for name in hubs}

        def start(name: str) -> HubProcess:
            service = hubs[name]
            hub_env = hub_environment(service, env)
            # compose's `hostname` is what the default instance id starts with.
            instance_ids[name] = f"{service['hostname']}-{uuid.uuid4().hex[:6]}"
            hub_env["HUB_INSTANCE_ID"] = instance_ids[name]
            return start_hub_process(hub_env, "--host", "127.0.0.1", *hub_args(service),
                                     port=ports[name], tmp_path=tmp_path)

        with_threads = [(name, _start_in_thread(start, name)) for name in hubs]
        for name, result in with_threads:
            processes[name] = result()
        nginx, nginx_port = start_nginx(tmp_path, ports)
    except BaseException:
        for process in processes.values():
            stop_process(process.process)
        raise
    topo = Topology(own_redis, processes, instance_ids, nginx, nginx_port, tmp_path)
    try:
        yield topo
    finally:
        stop_process(nginx)
        for process in processes.values():
            stop_process(process.process)


def _start_in_thread(start: Callable[[str], HubProcess], name: str) -> Callable[[], HubProcess]:
    """Start hub processes side by side (each takes seconds to import and start)."""
    import concurrent.futures

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = executor.submit(start, name)
    executor.shutdown(wait=False)
    return future.result


# -- clients ---------------------------------------------------------------------------------
@dataclass
class PlainClient:
    ws: ClientConnection
    instance_id: str
    received: list[str] = field(default_factory=list)

    async def expect(self, event_id: str) -> None:
        message = await recv_type(self.ws, TYPE)
        self.received.append(message["id"])
        assert message["id"] == event_id


async def plain_client(topo: Topology, **kwargs: Any) -> PlainClient:
    ws = await ws_connect(topo.ws_url, make_token("plain"), **kwargs)
    hello = await recv_json(ws)
    assert hello["type"] == "connection_established"
    await send_json(ws, {"action": "subscribe", "event_types": [TYPE]})
    assert (await recv_type(ws, "subscription_updated"))["data"]["subscribed_to"] == [TYPE]
    return PlainClient(ws, hello["data"]["instance_id"])


class SioClient:
    """python-socketio's AsyncClient through nginx from its own loopback address (nginx
    picks the Socket.IO replica by client address), resuming from the last id it saw."""

    def __init__(self, topo: Topology, transport: str, address: str) -> None:
        self.topo, self.transport, self.address = topo, transport, address
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
        self.client = socketio.AsyncClient(reconnection=False, http_session=self.http)
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.resumed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.disconnect_reason: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.received: list[str] = []
        self.service = ""
        self.client.on(TYPE, self._on_event)
        self.client.on("resumed", self.resumed.put)
        self.client.on("disconnect", self._on_disconnect)

    async def _on_event(self, envelope: dict[str, Any]) -> None:
        await self.events.put(envelope)

    async def _on_disconnect(self, reason: Any = None) -> None:
        if not self.disconnect_reason.done():
            self.disconnect_reason.set_result(reason)

    async def connect(self, last_event_id: str | None = None) -> None:
        auth: dict[str, Any] = {"token": make_token("sio"), "event_types": [TYPE]}
        if last_event_id is not None:
            auth["last_event_id"] = last_event_id
        self.disconnect_reason = asyncio.get_running_loop().create_future()
        await self.client.connect(self.topo.url, auth=auth, transports=[self.transport],
                                  wait_timeout=10)

    async def expect(self, event_id: str) -> None:
        envelope = await asyncio.wait_for(self.events.get(), 10)
        self.received.append(envelope["id"])
        assert envelope["id"] == event_id

    async def close(self) -> None:
        await self.client.disconnect()
        await self.http.close()


class SseClient:
    """An SSE stream through nginx (``types=TYPE``), reconnected as EventSource does:
    with Last-Event-ID, the last id it saw."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.received: list[str] = []
        self.instance_id = ""
        self._stack = contextlib.AsyncExitStack()
        self.stream: SseStream | None = None

    async def connect(self) -> None:
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        headers = {"last-event-id": self.received[-1]} if self.received else None
        self.stream = await self._stack.enter_async_context(sse_connect(
            self.topo.url, make_token("sse"), params={"types": TYPE}, headers=headers))
        hello = await self.stream.next_event("connection_established")
        self.instance_id = hello.json["data"]["instance_id"]

    async def expect(self, event_id: str) -> None:
        assert self.stream is not None
        event = await self.stream.next_event(TYPE)
        assert event.id is not None
        self.received.append(event.id)
        assert event.id == event_id

    async def ended(self) -> None:
        """Nothing but heartbeats (one is due every 15 s, and a loaded run may have sent
        it since the last event read), then the end of the stream."""
        assert self.stream is not None
        while (block := await self.stream.next(timeout=10)) is not None:
            assert block.comments == ["heartbeat"] and not block.data, block

    async def close(self) -> None:
        await self._stack.aclose()


async def socketio_counts(topo: Topology) -> dict[str, int]:
    counts = {}
    async with httpx.AsyncClient() as http:
        for name, hub in topo.hubs.items():
            if name not in topo.stopped:
                health = (await http.get(f"{hub.url}/ws/health")).json()
                counts[name] = health["connections"]["socketio"]
    return counts


async def wait_counts(topo: Topology, total: int) -> dict[str, int]:
    """Health until the replicas together report ``total`` Socket.IO clients (bounded)."""
    for _ in range(500):
        counts = await socketio_counts(topo)
        if sum(counts.values()) == total:
            return counts
        await asyncio.sleep(0.02)
    raise AssertionError(f"Socket.IO connections never reached {total}: {counts}")


async def publish(topo: Topology, service: str) -> str:
    """POST /events straight to one replica (publishing *on* that instance)."""
    admin = make_token("ops", "admin")
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{topo.hubs[service].url}/events",
                                   json={"type": TYPE, "data": THREAT},
                                   headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.fixture
async def sio_clients() -> AsyncIterator[list[SioClient]]:
    clients: list[SioClient] = []
    yield clients
    for client in clients:
        await client.close()


# -- the scenario ----------------------------------------------------------------------------
async def test_through_nginx_events_reach_both_replicas_and_failover_loses_nothing(
        topology: Topology, sio_clients: list[SioClient]) -> None:
    topo = topology
    services = sorted(topo.hubs)
    assert len(services) == 2

    # Plain clients: nginx balances by open connections, so both replicas get some.
    plain: list[PlainClient] = []
    for _ in range(10):
        plain.append(await plain_client(topo))
        if {c.instance_id for c in plain} == set(topo.instance_ids.values()):
            break
    assert {c.instance_id for c in plain} == set(topo.instance_ids.values())
    # A browser on the public origin passes: nginx forwards Host with its port.
    browser = await plain_client(topo, additional_headers={"Origin": topo.url})
    plain.append(browser)

    # SSE streams: balanced like plain WebSockets, until both replicas hold one.
    sse: list[SseClient] = []
    for _ in range(10):
        stream = SseClient(topo)
        await stream.connect()
        sse.append(stream)
        if {c.instance_id for c in sse} == set(topo.instance_ids.values()):
            break
    assert {c.instance_id for c in sse} == set(topo.instance_ids.values())

    # Socket.IO clients, long-polling and WebSocket: nginx picks the replica by client
    # address, so connect from successive loopback addresses until both are covered.
    address = iter(f"127.0.0.{n}" for n in range(2, 250))
    for transport in ("polling", "websocket"):
        seen: set[str] = set()
        for _ in range(24):
            before = await wait_counts(topo, len(sio_clients))
            client = SioClient(topo, transport, next(address))
            sio_clients.append(client)
            await client.connect()
            after = await wait_counts(topo, len(sio_clients))
            client.service = next(s for s in services if after[s] == before[s] + 1)
            seen.add(client.service)
            if seen == set(services):
                break
        assert seen == set(services), f"{transport} clients did not reach both replicas"

    # An event published on either replica reaches every client on both, once.
    first = await publish(topo, services[0])
    second = await publish(topo, services[1])
    everyone: list[PlainClient | SioClient | SseClient] = [*plain, *sio_clients, *sse]
    for member in everyone:
        await member.expect(first)
        await member.expect(second)

    # Stop one replica. Its clients are closed (plain: 1001), reconnect through nginx to
    # the other replica and resume from the last id they saw.
    victim, survivor = services
    on_victim_plain = [c for c in plain if topo.service_of(c.instance_id) == victim]
    on_victim_sio = [c for c in sio_clients if c.service == victim]
    assert on_victim_plain and on_victim_sio
    on_victim_sse = [c for c in sse if topo.service_of(c.instance_id) == victim]
    assert on_victim_sse
    stop_process(topo.hubs[victim].process)
    topo.stopped.add(victim)
    for sse_client in on_victim_sse:
        await sse_client.ended()  # the drain ends the response after the flush
    for plain_client_ in on_victim_plain:
        assert (await close_code(plain_client_.ws))[0] == 1001
    for sio_client in on_victim_sio:
        await asyncio.wait_for(sio_client.disconnect_reason, 10)

    # Published while they are away: they must get these on resume, nothing twice.
    missed = [await publish(topo, survivor), await publish(topo, survivor)]
    for plain_member in [c for c in plain if c not in on_victim_plain]:
        for event_id in missed:
            await plain_member.expect(event_id)
    for sio_client in [c for c in sio_clients if c not in on_victim_sio]:
        for event_id in missed:
            await sio_client.expect(event_id)
    for sse_client in sse:
        if sse_client not in on_victim_sse:
            for event_id in missed:
                await sse_client.expect(event_id)
            continue
        await sse_client.connect()  # through nginx, to the survivor, with Last-Event-ID
        assert sse_client.instance_id == topo.instance_ids[survivor]
        for event_id in missed:
            await sse_client.expect(event_id)
        assert sse_client.stream is not None
        sse_resumed = await sse_client.stream.next_event("resumed")
        assert sse_resumed.json["data"]["replayed"] == len(missed)

    for old in on_victim_plain:
        ws = await ws_connect(topo.ws_url, make_token("plain"))
        hello = await recv_json(ws)
        assert hello["data"]["instance_id"] == topo.instance_ids[survivor]
        await send_json(ws, {"action": "subscribe", "event_types": [TYPE],
                             "last_event_id": old.received[-1]})
        await recv_type(ws, "subscription_updated")
        old.ws, old.instance_id = ws, hello["data"]["instance_id"]
        for event_id in missed:
            await old.expect(event_id)
        resumed = await recv_type(ws, "resumed")
        assert resumed["data"]["replayed"] == len(missed)
        assert resumed["data"]["truncated"] is False

    for sio_client in on_victim_sio:
        # The hub's drain disconnects Socket.IO sockets itself, which socket.io clients
        # take as final ("io server disconnect"): the application reconnects, as the
        # Socket.IO documentation prescribes, here with the id it last saw.
        await sio_client.connect(last_event_id=sio_client.received[-1])
        for event_id in missed:
            await sio_client.expect(event_id)
        resumed = await asyncio.wait_for(sio_client.resumed.get(), 10)
        assert resumed["replayed"] == len(missed)
    counts = await wait_counts(topo, len(sio_clients))
    assert counts == {survivor: len(sio_clients)}

    # And live events keep flowing to everyone, now all on the survivor.
    last = await publish(topo, survivor)
    for member in everyone:
        await member.expect(last)
        assert member.received == [first, second, *missed, last], "lost or duplicated"

    for plain_member in plain:
        await plain_member.ws.close()
    for sse_client in sse:
        await sse_client.close()


def test_render_nginx_replaces_every_service_host(tmp_path: Path) -> None:
    hubs = hub_services(load_compose())
    rendered = render_nginx(NGINX_CONF.read_text(), {name: 1000 + i for i, name in
                                                     enumerate(hubs)}, 4321, tmp_path)
    for name in hubs:
        assert f"{name}:" not in rendered
    assert "listen 127.0.0.1:4321;" in rendered


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", env) == "x/d/d"
    assert interpolate("${EMPTY-d}/${UNSET-d}/$$/${SET}", env) == "/d/$/x"
    with pytest.raises(ValueError, match="UNSET"):
        interpolate("${UNSET:?set it}", env)
