"""Engine.IO sessions and the WebSockets that carry them: bogus, duplicate and stale sids,
sessions that never authenticate, oversized polling bodies, Socket.IO v2 clients, message
floods, closing a session whose peer stopped reading, and closing while a poll waits."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    SECRET,
    RedisServer,
    RunningHub,
    make_settings,
    make_token,
    run_hub,
    start_hub_process,
    stop_process,
)
from tests.helpers import THREAT, client_frame, connected, stalled_client, wait_until
from tests.sio_helpers import SioClient

SIO = "/socket.io/"


class Polling:
    """A raw Engine.IO long-polling session (what a browser's first requests are)."""

    def __init__(self, http: httpx.AsyncClient, base: str) -> None:
        self.http, self.base, self.sid = http, base, ""

    async def open(self) -> httpx.Response:
        response = await self.http.get(f"{self.base}{SIO}?EIO=4&transport=polling")
        if response.status_code == 200:
            assert response.text.startswith("0")
            self.sid = orjson.loads(response.text[1:])["sid"]
        return response

    def url(self) -> str:
        return f"{self.base}{SIO}?EIO=4&transport=polling&sid={self.sid}"

    async def post(self, body: str | bytes) -> httpx.Response:
        return await self.http.post(self.url(), content=body)

    async def get(self) -> httpx.Response:
        return await self.http.get(self.url())


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def bogus_websocket(port: int, sid: str) -> None:
    url = f"ws://127.0.0.1:{port}{SIO}?EIO=4&transport=websocket&sid={sid}"
    try:
        async with websockets.connect(url, open_timeout=10) as ws:
            await ws.send("2probe")
            await ws.send("5")
            await asyncio.wait_for(ws.recv(), 10)
    except (InvalidStatus, ConnectionClosed):
        pass


# -- sids -------------------------------------------------------------------------------
async def test_websockets_with_unknown_sids_leave_nothing_behind(tmp_path: Path) -> None:
    """Thousands of WebSocket requests with made-up sids: refused, and the server's memory
    stays flat (before the fix, 5,000 of them grew it from 65 to 147 MB)."""
    hub = start_hub_process({"JWT_SECRET": SECRET}, tmp_path=tmp_path)
    try:
        async def burst(n: int) -> None:
            for start in range(0, n, 50):
                await asyncio.gather(*(bogus_websocket(hub.port, secrets.token_urlsafe(15))
                                       for _ in range(start, min(n, start + 50))))

        await burst(300)  # warm-up: allocator pools, lazily imported code
        before = rss_kb(hub.process.pid)
        await burst(3000)
        after = rss_kb(hub.process.pid)
        print(f"RSS over 3000 WebSocket requests with unknown sids: {before} -> {after} kB")
        # 3,000 leaked entries cost ~50 MB before the fix; allow allocator noise.
        assert after - before < 12_000, (before, after)
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{hub.url}/ws/health")).json()
        assert health["active_connections"] == 0
    finally:
        stop_process(hub.process)


async def test_a_second_websocket_with_a_live_sid_cannot_take_the_socket_over(
        memory_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token()},
                         transports=["polling", "websocket"])
    await wait_until(lambda: client.client.transport() == "websocket", what="the upgrade")
    transport = memory_hub.hub.socketio
    eio_sid = client.client.eio.sid
    carrier = transport._ws_sinks.get(eio_sid)
    assert carrier is not None
    # Before the first event after the upgrade: the moment the old code let a second
    # WebSocket replace the sink the socket was about to attach.
    await bogus_websocket(memory_hub.port, eio_sid)
    assert transport._ws_sinks == {eio_sid: carrier}
    for n in range(3):
        await memory_hub.publish("threat_detected", {**THREAT, "n": n})
    assert [(await client.next_event())["data"]["n"] for _ in range(3)] == [0, 1, 2]
    await client.close()
    await wait_until(lambda: not transport._ws_sinks, what="the carrier to be forgotten")


async def test_a_stale_sid_is_refused_and_kept_nowhere(memory_hub: RunningHub) -> None:
    client = SioClient()
    await client.connect(memory_hub.url, auth={"token": make_token()},
                         transports=["polling"])
    eio_sid = client.client.eio.sid
    await client.close()
    transport = memory_hub.hub.socketio
    await wait_until(lambda: not memory_hub.hub.socketio.connections, what="the disconnect")
    await bogus_websocket(memory_hub.port, eio_sid)
    async with httpx.AsyncClient() as http:
        stale = await http.get(f"{memory_hub.url}{SIO}?EIO=4&transport=polling&sid={eio_sid}")
    assert stale.status_code == 400
    assert not transport._ws_sinks and not transport._unbound


async def test_close_while_polling_answers_the_pending_get_with_a_noop(
        memory_hub: RunningHub) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        session = Polling(http, memory_hub.url)
        await session.open()
        assert (await session.post("40" + orjson.dumps({"token": make_token()}).decode())
                ).status_code == 200
        connected = await session.get()
        assert connected.text.startswith("40")
        pending = asyncio.create_task(session.get())
        sock = memory_hub.hub.socketio.sio.eio.sockets[session.sid]
        # The GET waits on the session's queue (hub's LeanQueue keeps its waiters).
        await wait_until(lambda: len(memory_hub.hub.socketio.connections) == 1
                         and bool(sock.queue._waiters) and not pending.done(),
                         what="the poll to wait")
        assert (await session.post("1")).status_code == 200  # CLOSE
        answer = await asyncio.wait_for(pending, 10)
        assert (answer.status_code, answer.text) == (200, "6")


# -- what engine.io would not answer ----------------------------------------------------
async def test_socketio_v2_clients_are_told_which_versions_are_supported(
        memory_hub: RunningHub) -> None:
    async with httpx.AsyncClient() as http:
        polling = await http.get(f"{memory_hub.url}{SIO}?EIO=3&transport=polling")
    assert polling.status_code == 400
    assert polling.json()["code"] == "unsupported_protocol"
    assert "socket.io-client 3.x and 4.x" in polling.json()["message"]
    async with websockets.connect(
            f"ws://127.0.0.1:{memory_hub.port}{SIO}?EIO=3&transport=websocket") as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1008
    assert ws.close_reason is not None and "socket.io-client 3.x or 4.x" in ws.close_reason


async def test_an_oversized_polling_post_gets_413_at_once(memory_hub: RunningHub) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        session = Polling(http, memory_hub.url)
        await session.open()
        # Over HUB_MAX_MESSAGE_BYTES but under the HTTP layer's body limit (which answers a
        # larger body with 413 before engine.io sees it, tests/test_attacks.py): the
        # Socket.IO transport refuses it and ends the session.
        response = await session.post(b"4" + b"x" * 66_000)
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"
        await wait_until(lambda: not memory_hub.hub.socketio._unbound,
                         what="the session to end")
        session = Polling(http, memory_hub.url)
        await session.open()
        response = await session.post(b"4" + b"x" * 70_000)
        assert response.status_code == 413


async def test_sessions_that_never_connect_are_capped_and_time_out() -> None:
    # Long enough that none of the sessions below times out before the caps are checked,
    # on a loaded machine too.
    settings = make_settings(socketio_unbound_limit=6, socketio_unbound_per_address=3,
                             socketio_connect_timeout_s=5.0)
    async with run_hub(settings) as running:
        transport = running.hub.socketio

        def client(address: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                timeout=10, transport=httpx.AsyncHTTPTransport(local_address=address))

        async with client("127.0.0.1") as one, client("127.0.0.2") as two, \
                client("127.0.0.3") as three:
            first = [Polling(one, running.url) for _ in range(4)]
            statuses = [(await s.open()).status_code for s in first]
            assert statuses == [200, 200, 200, 503]  # per address
            refused = await first[3].open()
            assert refused.json()["code"] == "too_many_sessions"
            assert [(await Polling(two, running.url).open()).status_code
                    for _ in range(3)] == [200, 200, 200]
            assert (await Polling(three, running.url).open()).status_code == 503  # global
            assert len(transport._unbound) == 6
            # Nobody authenticates: the sessions end after the connect timeout.
            # (Each leaves _unbound at its timeout; engine.io forgets it once it is closed.)
            await wait_until(lambda: not transport._unbound and not transport.sio.eio.sockets,
                             timeout=30, what="unauthenticated sessions to time out")
            assert (await first[0].get()).status_code == 400  # that session is gone
            # A client that does authenticate gets in and stops counting.
            session = Polling(one, running.url)
            assert (await session.open()).status_code == 200
            await session.post("40" + orjson.dumps({"token": make_token()}).decode())
            await wait_until(lambda: len(transport.connections) == 1, what="the connect")
            assert not transport._unbound


async def test_bad_token_sessions_do_not_pile_up() -> None:
    """A refused CONNECT ends its Engine.IO session (before the fix, 2,000 bad-token
    connections grew the server by 90 MB and stayed)."""
    import socketio

    settings = make_settings(socketio_connect_timeout_s=60)
    async with run_hub(settings) as running:
        transport = running.hub.socketio
        clients = []
        for _ in range(20):
            client = SioClient()
            with pytest.raises(socketio.exceptions.ConnectionError):
                await client.connect(running.url, auth={"token": "forged"},
                                     transports=["polling"])
            clients.append(client)
        await wait_until(lambda: not transport._unbound and running.hub.socketio.sio.eio
                         .sockets == {}, timeout=15, what="refused sessions to end")
        assert running.hub.limits.total == 0
        for client in clients:
            await client.client.disconnect()


async def test_per_user_cap_counts_both_transports() -> None:
    import socketio

    async with run_hub(make_settings(max_connections_per_user=2)) as running:
        ws = await connected(running.ws_url, make_token("carol"))
        first = SioClient()
        await first.connect(running.url, auth={"token": make_token("carol")},
                            transports=["polling", "websocket"])
        second = SioClient()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await second.connect(running.url, auth={"token": make_token("carol")})
        refusal = await asyncio.wait_for(second.connect_error, 10)
        assert refusal["data"]["code"] == 1013
        other = SioClient()  # another user is not affected
        await other.connect(running.url, auth={"token": make_token("dave")})
        assert running.hub.limits.total == 3
        await wait_until(lambda: len(running.hub.socketio.sio.eio.sockets) == 2,
                         what="the refused session to end")
        await ws.close()
        for client in (first, other):
            await client.close()


# -- message floods ---------------------------------------------------------------------
async def test_a_socketio_message_flood_disconnects_the_client() -> None:
    async with run_hub(make_settings(client_rate=5, client_burst=10)) as running:
        client = SioClient()
        await client.connect(running.url, auth={"token": make_token()})
        for _ in range(40):
            await client.client.emit("subscribe", {"event_types": ["threat_detected"]})
        error = await client.next_other("error")
        assert error["code"] == "rate_limited"
        await asyncio.wait_for(client.disconnected.wait(), 10)
        await wait_until(lambda: not running.hub.socketio.connections, what="the disconnect")
        assert running.hub.limits.total == 0


async def test_a_flood_before_connecting_ends_the_session() -> None:
    async with run_hub(make_settings(client_rate=5, client_burst=10)) as running, \
            httpx.AsyncClient(timeout=10) as http:
        session = Polling(http, running.url)
        await session.open()
        body = "\x1e".join(["42[\"subscribe\",{}]"] * 8)  # engine.io takes 16 a POST
        for _ in range(4):
            if (await session.post(body)).status_code != 200:
                break
        await wait_until(lambda: not running.hub.socketio.sio.eio.sockets,
                         what="the flooding session to end")


# -- closing a peer that stopped reading -----------------------------------------------
async def test_a_stalled_socketio_peer_is_aborted_after_the_close_timeout() -> None:
    settings = make_settings(outbox_limit=20, close_timeout_s=0.5)
    async with run_hub(settings) as running:
        reader, stalled = await stalled_client(
            running.port, make_token("slow"), path=f"{SIO}?EIO=4&transport=websocket")
        stalled.write(client_frame("40" + orjson.dumps({"token": make_token("slow")}).decode()))
        transport = running.hub.socketio
        await wait_until(lambda: len(transport.connections) == 1, what="the connect")
        sink = next(iter(transport._ws_sinks.values()))
        kicked = running.hub.metrics.slow_consumers.labels("socketio")
        big = {"severity": "info", "message": "x" * 32_000}
        sent = 0
        while kicked._value.get() == 0 and sent < 5_000:
            await running.publish("cost_threshold_alert", {**big, "n": sent})
            await asyncio.sleep(0)
            sent += 1
        assert kicked._value.get() == 1
        # The peer never reads the close: the descriptor is freed by the abort.
        await wait_until(lambda: sink.gone, timeout=15, what="the stalled transport to end")
        await wait_until(lambda: not transport._ws_sinks and not transport.connections,
                         what="the bookkeeping to clear")
        stalled.transport.abort()
        del reader


# -- tenants on the external-emitter path ----------------------------------------------
async def test_external_emitter_events_are_tenant_scoped(redis_hubs: tuple[RunningHub, ...],
                                                         redis_server: RedisServer) -> None:
    import socketio

    first, _second = redis_hubs
    settings = first.hub.settings
    # Each instance's manager subscribes to the channel in a task of its own: an emit
    # published before that is lost.
    raw = redis_server.client()
    await wait_until(lambda: raw.pubsub_numsub(settings.socketio_channel)[0][1] >= 2,
                     what="both instances to subscribe to the Socket.IO channel")
    raw.close()
    viewers: dict[str, SioClient] = {}
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("a", {"tenant_id": "A"}), ("b", {"tenant_id": "B"}), ("none", {}), ("admin", {}))
    for name, claims in cases:
        viewers[name] = SioClient()
        role = "admin" if name == "admin" else "viewer"
        await viewers[name].connect(first.url, auth={"token": make_token(name, role=role,
                                                                         **claims)})
    emitter = socketio.AsyncRedisManager(settings.redis_url,
                                         channel=settings.socketio_channel, write_only=True)
    await emitter.emit("threat_detected", {"type": "threat_detected",
                                           "data": {**THREAT, "tenant_id": "B", "n": 1}},
                       room="threat_detected")
    await emitter.emit("threat_detected", {"type": "threat_detected",
                                           "data": {**THREAT, "n": 2}},
                       room="threat_detected")
    got = {name: [(await v.next_event("threat_detected"))["data"]["n"]
                  for _ in range(2 if name in ("b", "admin") else 1)]
           for name, v in viewers.items()}
    assert got == {"a": [2], "b": [1, 2], "none": [2], "admin": [1, 2]}
    for viewer in viewers.values():
        await viewer.close()


async def test_a_ping_timeout_frees_a_peer_that_stopped_reading() -> None:
    """engine.io drops a client that stops answering pings; when that client also stopped
    reading, with frames stuck behind its full buffer, the WebSocket's close would wait
    for ever: it is aborted after the close timeout."""
    # No hold for a first message: the events must reach the socket's buffer at once.
    # Its first ping goes out 3 s after the handshake: time to see it connect (and its
    # WebSocket) before engine.io drops it, however loaded the machine.
    settings = make_settings(outbox_limit=100_000, ping_interval_s=3, ping_timeout_s=0.5,
                             close_timeout_s=0.5, resume_hold_s=0)
    async with run_hub(settings) as running:
        _reader, stalled = await stalled_client(
            running.port, make_token("gone"), path=f"{SIO}?EIO=4&transport=websocket")
        stalled.write(client_frame("40" + orjson.dumps({"token": make_token("gone")}).decode()))
        transport = running.hub.socketio
        await wait_until(lambda: len(transport.connections) == 1, what="the connect")
        sink = next(iter(transport._ws_sinks.values()))
        big = {"severity": "info", "message": "x" * 32_000}
        for n in range(300):  # ~10 MB: far more than the socket buffers take
            await running.publish("cost_threshold_alert", {**big, "n": n})
        assert not sink.ready()  # backpressure: the peer does not read
        await wait_until(lambda: sink.gone, timeout=20, what="the transport to be aborted")
        await wait_until(lambda: not transport.connections and not transport._ws_sinks,
                         what="the bookkeeping to clear")
        assert running.hub.limits.total == 0
        stalled.transport.abort()


async def test_ping_settings_reach_the_handshake() -> None:
    from hub.config import Settings
    from hub.errors import ConfigError

    settings = Settings.from_env({"JWT_SECRET": SECRET, "HUB_PING_INTERVAL_S": "3",
                                  "HUB_PING_TIMEOUT_S": "2.5"})
    assert (settings.ping_interval_s, settings.ping_timeout_s) == (3.0, 2.5)
    for bad in ({"HUB_PING_INTERVAL_S": "0.5"}, {"HUB_PING_TIMEOUT_S": "0"},
                {"HUB_SOCKETIO_UNBOUND_LIMIT": "0"}, {"HUB_CLOSE_TIMEOUT_S": "-1"}):
        with pytest.raises(ConfigError):
            Settings.from_env({"JWT_SECRET": SECRET, **bad})
    async with run_hub(make_settings(ping_interval_s=3, ping_timeout_s=2.5)) as running, \
            httpx.AsyncClient() as http:
        opened = await http.get(f"{running.url}{SIO}?EIO=4&transport=polling")
        handshake = orjson.loads(opened.text[1:])
    assert (handshake["pingInterval"], handshake["pingTimeout"]) == (3000, 2500)
