"""Contract tests for hub/_compat: every assumption hub makes about uvicorn,
python-engineio and python-socketio internals, checked against the installed releases.

A failure names the library and its version (``CompatError``); the version ranges in
pyproject.toml are the ones these tests pass on. tests/test_compat_versions.py runs this
file again in a virtualenv holding the lowest allowed versions.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import engineio
import httpx
import orjson
import pytest
import socketio
import websockets
from engineio import packet as eio_packet

from hub._compat import CompatError
from hub._compat import engineio as eio_compat
from hub._compat import uvicorn as uvicorn_compat
from hub._compat.lean import LeanFlag, LeanInbox
from hub.transports.frames import SEND_KEY
from tests.conftest import SECRET, RunningHub, make_token, start_hub_process, stop_process
from tests.helpers import THREAT, connected, recv_type, wait_until
from tests.sio_helpers import SioClient

SIO = "/socket.io/"


def expect(condition: object, distribution: str, assumption: str) -> None:
    if not condition:
        raise CompatError(distribution, assumption)


def test_compat_error_names_library_and_version() -> None:
    message = str(CompatError("python-engineio", "something changed"))
    from importlib import metadata

    assert message.startswith(
        f"python-engineio {metadata.version('python-engineio')}: something changed")


# -- uvicorn ----------------------------------------------------------------------------
def test_uvicorn_protocols_hub_extends_have_what_it_overrides() -> None:
    """hub/_compat/uvicorn_protocols.py subclasses uvicorn's httptools and websockets-sansio
    protocols (the request limits and bounded closes): the hooks it overrides and the
    state it reads must be there."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    for name in ("connection_made", "connection_lost", "data_received", "eof_received",
                 "pause_writing", "resume_writing", "on_message_begin", "on_url",
                 "on_header", "on_headers_complete", "on_body", "on_message_complete"):
        expect(callable(getattr(HttpToolsProtocol, name, None)), "uvicorn",
               f"HttpToolsProtocol.{name} exists (hub's HTTP limits override it)")
    for name in ("connection_made", "connection_lost", "data_received", "handle_connect",
                 "send"):
        expect(callable(getattr(WebSocketsSansIOProtocol, name, None)), "uvicorn",
               f"WebSocketsSansIOProtocol.{name} exists (hub's bounded close overrides it)")
    params = list(inspect.signature(HttpToolsProtocol.__init__).parameters)
    expect(params[:5] == ["self", "config", "server_state", "app_state", "_loop"], "uvicorn",
           f"HttpToolsProtocol(config, server_state, app_state, _loop) (got {params})")
    params = list(inspect.signature(WebSocketsSansIOProtocol.__init__).parameters)
    expect(params[:5] == ["self", "config", "server_state", "app_state", "_loop"], "uvicorn",
           f"WebSocketsSansIOProtocol(config, server_state, app_state, _loop) (got {params})")
    source = inspect.getsource(WebSocketsSansIOProtocol)
    for attribute in ("self.conn", "self.queue", "self.handshake_initiated",
                      "self.handshake_complete", "self.initial_response", "self.client"):
        expect(attribute in source, "uvicorn",
               f"WebSocketsSansIOProtocol keeps {attribute} (read by hub's protocol)")
    expect(hasattr(httptools, "HttpRequestParser"), "httptools", "HttpRequestParser exists")


def test_uvicorn_uses_only_what_hubs_lean_queue_and_flag_have() -> None:
    """HubWebSocketProtocol swaps uvicorn's per-connection ``asyncio.Queue`` and
    ``asyncio.Event`` (about 4 KB on every idle connection) for LeanInbox and LeanFlag,
    and its ``receive`` for the inbox's ``get``: uvicorn must use nothing else of them,
    and its ``receive`` must do nothing but that get and resuming a paused read."""
    import re

    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    source = inspect.getsource(WebSocketsSansIOProtocol)
    for attribute, lean in (("queue", LeanInbox), ("writable", LeanFlag)):
        used = set(re.findall(rf"self\.{attribute}\.(\w+)", source))
        expect(used and used <= set(dir(lean)), "uvicorn",
               f"WebSocketsSansIOProtocol uses {sorted(used)} of self.{attribute} "
               f"({lean.__name__} has what it uses)")
    receive = inspect.getsource(WebSocketsSansIOProtocol.receive)
    expect(set(re.findall(r"self\.(\w+)", receive)) <= {"queue", "read_paused", "transport"}
           and "resume_reading" in receive, "uvicorn",
           "WebSocketsSansIOProtocol.receive is queue.get() and resuming a paused read")
    init = inspect.getsource(WebSocketsSansIOProtocol.__init__)
    expect("self.queue" in init and "self.writable" in init, "uvicorn",
           "WebSocketsSansIOProtocol.__init__ makes queue and writable (hub replaces them)")


async def _protocol(hub: RunningHub) -> tuple[Any, Any]:
    ws = await connected(hub.ws_url, make_token())
    await wait_until(lambda: hub.hub.websocket.connections, what="the connection")
    conn = next(iter(hub.hub.websocket.connections))
    send = conn.websocket.scope[SEND_KEY]
    protocol = getattr(send, "__self__", None)
    expect(protocol is not None and any(cls.__name__ == uvicorn_compat.PROTOCOL_CLASS
                                        for cls in type(protocol).__mro__),
           "uvicorn", f"the raw ASGI send of a WebSocket is {uvicorn_compat.PROTOCOL_CLASS}"
           f".send (got {send!r})")
    return ws, protocol


async def test_uvicorn_send_is_the_sansio_protocol_with_what_hub_uses(
        memory_hub: RunningHub) -> None:
    ws, protocol = await _protocol(memory_hub)
    for name in uvicorn_compat.ATTRIBUTES:
        expect(hasattr(protocol, name), "uvicorn", f"the sans-I/O protocol has {name!r}")
    expect(isinstance(protocol.writable, LeanFlag), "uvicorn",
           "protocol.writable is hub's LeanFlag (in place of uvicorn's asyncio.Event)")
    expect(isinstance(protocol.queue, LeanInbox), "uvicorn",
           "protocol.queue is hub's LeanInbox (in place of uvicorn's asyncio.Queue)")
    for method in ("write", "is_closing", "abort"):
        expect(callable(getattr(protocol.transport, method, None)), "uvicorn",
               f"protocol.transport has {method}()")
    expect(protocol.close_sent is False and protocol.disconnected is False, "uvicorn",
           "close_sent and disconnected are False on an open connection")
    expect(uvicorn_compat.sansio_protocol(protocol.send) is protocol, "uvicorn",
           "hub finds the protocol from send")
    await ws.close()


async def test_uvicorn_sets_writable_when_a_paused_connection_is_lost(
        memory_hub: RunningHub) -> None:
    """hub's writers wait on ``writable``; if a connection lost while paused never set it
    (before uvicorn 0.53), they would wait for ever."""
    ws, protocol = await _protocol(memory_hub)
    protocol.pause_writing()  # what the transport calls when its buffer fills
    expect(not protocol.writable.is_set(), "uvicorn", "pause_writing clears writable")
    ws.transport.abort()
    await wait_until(lambda: protocol.disconnected, what="uvicorn to see the connection lost")
    expect(protocol.writable.is_set(), "uvicorn",
           "connection_lost sets writable (needs uvicorn >= 0.53)")


async def test_uvicorn_abort_ends_the_connection(memory_hub: RunningHub) -> None:
    ws, protocol = await _protocol(memory_hub)
    uvicorn_compat.abort(protocol)
    await wait_until(lambda: protocol.disconnected, what="the abort")
    expect(uvicorn_compat.is_gone(protocol), "uvicorn", "an aborted connection is gone")
    del ws


async def test_uvicorn_http_send_is_the_request_cycle_with_a_transport(
        memory_hub: RunningHub) -> None:
    """hub.transports.sse drops a slow consumer's connection through the HTTP send's
    ``RequestResponseCycle.transport`` (hub._compat.uvicorn.abort_http)."""
    from tests.sse_helpers import sse_connect

    async with sse_connect(memory_hub.url, make_token()) as stream:
        await stream.next_event("connection_established")
        (conn,) = memory_hub.hub.sse.connections
        send = conn._raw_send
        cycle: Any = getattr(send, "__self__", None)
        expect(type(cycle).__name__ == uvicorn_compat.HTTP_CYCLE_CLASS, "uvicorn",
               "an HTTP request's send is RequestResponseCycle.send")
        expect(cycle.disconnected is False, "uvicorn", "the cycle has disconnected (False)")
        transport = uvicorn_compat.http_transport(send)
        expect(transport is not None and callable(getattr(transport, "abort", None)),
               "uvicorn", "the cycle's transport has abort()")
        expect(uvicorn_compat.abort_http(send), "uvicorn", "abort_http drops it")
        await wait_until(lambda: cycle.disconnected, what="uvicorn to see it lost")
        with pytest.raises(httpx.RemoteProtocolError):  # cut mid-body, as a drop is
            await stream.next()


# -- python-engineio --------------------------------------------------------------------
async def test_engineio_socket_send_only_queues() -> None:
    server = engineio.AsyncServer(async_mode="asgi")
    sock = engineio.async_socket.AsyncSocket(server, "sid")
    expect(isinstance(sock.queue, asyncio.Queue), "python-engineio",
           "AsyncSocket.queue is an asyncio.Queue")
    for name, value in (("connected", False), ("upgrading", False), ("upgraded", False),
                        ("closing", False), ("closed", False)):
        expect(getattr(sock, name, None) is value, "python-engineio",
               f"AsyncSocket.{name} starts {value}")
    pkt = eio_packet.Packet(eio_packet.MESSAGE, "2[]")
    await sock.send(pkt)
    expect(sock.queue.get_nowait() is pkt, "python-engineio",
           "AsyncSocket.send puts the packet on its queue and nothing else")
    sock.queue.task_done()
    server.sockets["sid"] = sock
    expect(eio_compat.queue_packet(server, "sid", pkt) == 1, "python-engineio",
           "hub queues on AsyncServer.sockets[sid].queue")
    expect(server.transport("sid") == "polling", "python-engineio",
           "AsyncServer.transport(sid) answers 'polling' before an upgrade")
    eio_compat.drop_queued(sock)
    eio_compat.end_poll(sock)
    polled = await sock.poll()
    expect([p.encode() for p in polled] == ["6"], "python-engineio",
           "a NOOP on the queue answers a pending poll with 6")
    for name in ("CLIENT_DISCONNECT", "SERVER_DISCONNECT", "PING_TIMEOUT"):
        expect(hasattr(server.reason, name), "python-engineio", f"AsyncServer.reason.{name}")
    params = inspect.signature(engineio.async_socket.AsyncSocket.close).parameters
    expect({"wait", "abort", "reason"} <= set(params), "python-engineio",
           "AsyncSocket.close(wait, abort, reason)")


async def test_engineio_upgrade_flags_follow_the_upgrade(memory_hub: RunningHub) -> None:
    """hub makes a WebSocket the carrier of a session when the client's ``5`` arrives
    while ``upgrading`` is set, and writes to it once ``transport(sid)`` says websocket."""
    eio = memory_hub.hub.socketio.sio.eio
    async with httpx.AsyncClient(timeout=10) as http:
        opened = await http.get(f"{memory_hub.url}{SIO}?EIO=4&transport=polling")
        sid = orjson.loads(opened.text[1:])["sid"]
        await http.post(f"{memory_hub.url}{SIO}?EIO=4&transport=polling&sid={sid}",
                        content="40" + orjson.dumps({"token": make_token()}).decode())
        sock: Any = eio_compat.socket(eio, sid)
        expect(sock is not None, "python-engineio", "AsyncServer.sockets holds open sessions")
        async with websockets.connect(f"ws://127.0.0.1:{memory_hub.port}{SIO}?EIO=4"
                                      f"&transport=websocket&sid={sid}") as ws:
            await wait_until(lambda: bool(sock.upgrading), what="engine.io to start the upgrade")
            expect(eio_compat.upgrade_in_progress(sock), "python-engineio",
                   "upgrading is set once the upgrade's WebSocket is accepted")
            await ws.send("2probe")
            expect(await ws.recv() == "3probe", "python-engineio", "2probe is answered 3probe")
            expect(eio_compat.upgrade_in_progress(sock) and not eio_compat.on_websocket(
                eio, sid), "python-engineio", "still upgrading between 3probe and 5")
            await ws.send("5")
            await wait_until(lambda: eio_compat.on_websocket(eio, sid), what="the upgrade")
            expect(not eio_compat.upgrade_in_progress(sock), "python-engineio",
                   "upgrading is cleared once 5 arrived")
            expect(memory_hub.hub.socketio.sink_for(sid) is not None, "python-engineio",
                   "the upgraded WebSocket carries the session")


# -- python-socketio --------------------------------------------------------------------
def test_engineio_internals_the_lean_session_replaces() -> None:
    """hub/_compat/engineio.py's LeanEngineIOServer and HubSocket (memory per idle
    session): what they replace must be where and what they expect."""
    import re

    from engineio import async_server, async_socket, base_socket

    from hub._compat.lean import LeanQueue

    expect("self.queue = self.server.create_queue()" in inspect.getsource(base_socket),
           "python-engineio", "a socket makes its queue with server.create_queue()")
    used: set[str] = set()
    for module in (async_server, async_socket, base_socket, eio_compat):
        used |= set(re.findall(r"\.queue\.(\w+)", inspect.getsource(module)))
    expect(used and used <= set(dir(LeanQueue)), "python-engineio",
           f"engine.io and hub use {sorted(used)} of a socket's queue (LeanQueue has them)")
    connect = inspect.getsource(async_server.AsyncServer._handle_connect)
    made, registered = (connect.find("async_socket.AsyncSocket(self, sid)"),
                        connect.find("self.sockets[sid] = s"))
    expect(0 <= made < registered < connect.find("s.schedule_ping()")
           and registered < connect.find("handle_get_request"), "python-engineio",
           "_handle_connect makes AsyncSocket(self, sid) and registers it in sockets[sid] "
           "before pinging or serving it (where it becomes a HubSocket)")
    for name in ("schedule_ping", "close", "_websocket_handler", "receive", "send"):
        expect(callable(getattr(async_socket.AsyncSocket, name, None)), "python-engineio",
               f"AsyncSocket.{name} exists (HubSocket overrides or calls it)")
    expect(list(inspect.signature(async_socket.AsyncSocket.close).parameters)
           == ["self", "wait", "abort", "reason"], "python-engineio",
           "AsyncSocket.close(wait, abort, reason)")
    ping = inspect.getsource(async_socket.AsyncSocket._send_ping)
    expect("sleep(self.server.ping_interval)" in ping and "packet.PING" in ping,
           "python-engineio", "a ping is a PING sent ping_interval after the last pong")
    handler = inspect.getsource(async_socket.AsyncSocket._websocket_handler)
    for step in ("'probe'", "packet.UPGRADE", "self.upgraded = True", "self.receive(pkt)",
                 "await self.queue.put(None)", "reason=self.server.reason.TRANSPORT_CLOSE"):
        expect(step in handler, "python-engineio",
               f"AsyncSocket._websocket_handler has {step} (HubSocket's copies its steps)")
    server = socketio.AsyncServer()
    expect(callable(getattr(server, "_engineio_server_class", None)), "python-socketio",
           "AsyncServer._engineio_server_class chooses the engine.io server")
    eio = eio_compat.LeanEngineIOServer(async_mode="asgi")
    expect(callable(eio._async.get("translate_request")), "python-engineio",
           "the asgi driver's translate_request is in AsyncServer._async")


def test_socketio_server_hooks_hub_overrides() -> None:
    for name, params in (("_handle_eio_connect", ["eio_sid", "environ"]),
                         ("_handle_eio_message", ["eio_sid", "data"]),
                         ("_handle_eio_disconnect", ["eio_sid", "reason"])):
        method = getattr(socketio.AsyncServer, name, None)
        expect(method is not None and list(inspect.signature(method).parameters)[1:] == params,
               "python-socketio", f"AsyncServer.{name}(self, {', '.join(params)})")
    server = socketio.AsyncServer(async_mode="asgi")
    for event, handler in (("connect", "_handle_eio_connect"),
                           ("message", "_handle_eio_message"),
                           ("disconnect", "_handle_eio_disconnect")):
        expect(server.eio.handlers.get(event) == getattr(server, handler), "python-socketio",
               f"engine.io's {event!r} event calls AsyncServer.{handler}")
    for name in ("get_participants", "eio_sid_from_sid", "basic_enter_room",
                 "basic_leave_room", "connect"):
        expect(callable(getattr(socketio.AsyncManager, name, None)), "python-socketio",
               f"AsyncManager.{name}")
    for name in ("_redis_connect", "_listen", "_handle_emit"):
        expect(callable(getattr(socketio.AsyncRedisManager, name, None)), "python-socketio",
               f"AsyncRedisManager.{name}")
    expect(callable(getattr(server, "get_environ", None)), "python-socketio",
           "AsyncServer.get_environ")


async def test_socketio_queues_connect_before_manager_connect(memory_hub: RunningHub) -> None:
    """hub starts delivery from the manager's ``connect`` (ConnectHookMixin): the CONNECT
    packet must already be queued then, or events would overtake it (19 of 24 Socket.IO
    tests time out on python-socketio 5.17)."""
    transport = memory_hub.hub.socketio
    manager = transport.sio.manager
    seen: list[list[str]] = []
    original = manager.on_connected

    def record(sid: str) -> None:
        eio_sid = manager.eio_sid_from_sid(sid, "/")
        sock = eio_compat.socket(transport.sio.eio, eio_sid)
        seen.append([p.encode() for p in sock.queue.items()] if sock else [])
        original(sid)

    manager.on_connected = record
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            opened = await http.get(f"{memory_hub.url}{SIO}?EIO=4&transport=polling")
            sid = orjson.loads(opened.text[1:])["sid"]
            await http.post(f"{memory_hub.url}{SIO}?EIO=4&transport=polling&sid={sid}",
                            content="40" + orjson.dumps({"token": make_token()}).decode())
    finally:
        manager.on_connected = original
    expect(len(seen) == 1 and any(p.startswith("40{") for p in seen[0]), "python-socketio",
           f"the CONNECT packet is queued before manager.connect runs (queue: {seen})")


async def test_socketio_participants_are_sid_pairs(memory_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token()})
    manager = memory_hub.hub.socketio.sio.manager
    pairs = list(manager.get_participants("/", "threat_detected"))
    expect(len(pairs) == 1 and len(pairs[0]) == 2, "python-socketio",
           "AsyncManager.get_participants yields (sid, eio_sid) pairs")
    await client.close()


# -- the direct frame path, end to end --------------------------------------------------
def _direct(metrics: str, transport: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("hub_frame_path_connections_total{") and \
                f'transport="{transport}"' in line and 'path="direct"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_hub_serve_takes_the_direct_frame_path(tmp_path: Path) -> None:
    """Under ``hub serve``, /ws/events connections and Socket.IO sockets (on a WebSocket
    from the start, and upgraded from polling) write events straight to uvicorn's
    transport. If a library change turned that path off, everything would still work,
    slower: only this test notices."""
    hub = start_hub_process({"JWT_SECRET": SECRET}, tmp_path=tmp_path)
    try:
        ws = await connected(f"ws://127.0.0.1:{hub.port}/ws/events", make_token("plain"))
        direct_ws = SioClient()
        await direct_ws.connect(hub.url, auth={"token": make_token("ws")})
        upgraded = SioClient()
        await upgraded.connect(hub.url, auth={"token": make_token("up")},
                               transports=["polling", "websocket"])
        await wait_until(lambda: upgraded.client.transport() == "websocket",
                         what="the upgrade")
        admin = make_token("publisher", role="admin")
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {admin}"}) as http:
            assert (await http.post(f"{hub.url}/events", json={
                "type": "threat_detected", "data": THREAT})).status_code == 202
            await recv_type(ws, "threat_detected")
            await direct_ws.next_event("threat_detected")
            await upgraded.next_event("threat_detected")
            metrics = (await http.get(f"{hub.url}/metrics")).text
        expect(_direct(metrics, "websocket") == 1, "uvicorn",
               "/ws/events under hub serve writes frames to the sans-I/O transport")
        expect(_direct(metrics, "socketio") == 2, "uvicorn",
               "Socket.IO under hub serve writes frames to the sans-I/O transport "
               "(WebSocket from the start, and after an upgrade)")
        await ws.close()
        await direct_ws.close()
        await upgraded.close()
    finally:
        stop_process(hub.process)


@pytest.fixture(autouse=True)
def _versions(record_property: Any) -> None:
    from hub._compat import version

    for name in ("uvicorn", "python-engineio", "python-socketio"):
        record_property(name, version(name))


# -- redis-py ---------------------------------------------------------------------------
def test_redis_py_internals_the_cluster_and_sentinel_code_reaches_into() -> None:
    """hub/dispatch/cluster.py (ShardBackend: a pipeline sent to one node, the slot map
    read again) and hub/dispatch/redis.py (subscribe(): a PubSub on a connection of its own
    to a node; the Sentinel master asked again) use redis-py beyond its documented API."""
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
    from redis.asyncio.connection import ConnectionPool
    from redis.asyncio.sentinel import SentinelConnectionPool
    from redis.crc import key_slot

    command = PipelineCommand(3, "WAIT", 1, 200)
    expect((command.position, command.args, command.result) == (3, ("WAIT", 1, 200), None),
           "redis", "PipelineCommand(position, *args) keeps position, args and a result")
    expect(list(inspect.signature(ClusterNode.execute_pipeline).parameters)
           == ["self", "commands"], "redis", "ClusterNode.execute_pipeline(commands)")
    node = ClusterNode("127.0.0.1", 7000, socket_timeout=2)
    expect(node.name == "127.0.0.1:7000" and node.connection_kwargs.get("socket_timeout") == 2
           and isinstance(node.connection_class, type), "redis",
           "a ClusterNode has name, connection_class and connection_kwargs")
    ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    cluster = RedisCluster(host="127.0.0.1", port=7000)  # connects on first use only
    expect(isinstance(cluster.nodes_manager.slots_cache, dict), "redis",
           "RedisCluster.nodes_manager.slots_cache maps a slot to its nodes")
    expect(cluster.keyslot("koreshield:events") == key_slot(b"koreshield:events"), "redis",
           "RedisCluster.keyslot(key) is the key's slot")
    expect(callable(cluster.get_nodes) and hasattr(cluster, "encoder"), "redis",
           "RedisCluster.get_nodes() and .encoder")
    expect("self._initialize = True" in inspect.getsource(RedisCluster), "redis",
           "setting RedisCluster._initialize makes the next command read the slot map")
    expect({"connection_pool", "ignore_subscribe_messages", "encoder"}
           <= set(inspect.signature(PubSub.__init__).parameters), "redis",
           "PubSub(connection_pool, ignore_subscribe_messages, encoder)")
    expect(callable(getattr(SentinelConnectionPool, "get_master_address", None)), "redis",
           "SentinelConnectionPool.get_master_address() asks the sentinels again")
