"""The revocation scenario (issue 15): how soon a revocation made on one instance closes the
user's connections on another.

Two hub instances on the bench's Redis. One user holds ``revocation_connections`` connections
of each transport on instance B: plain ``/ws/events``, Socket.IO (Engine.IO 4 over a
WebSocket) and SSE. ``POST /admin/revocations {"user_id": …}`` goes to instance A; each
connection records when it sees its end (``/ws/events``: the close frame, 4003
``token revoked``; Socket.IO: the server's disconnect packet after ``token_revoked``; SSE:
the end of the stream after ``token_revoked``), measured from the moment the POST is sent.
Then the same token must be refused at connect on B. The clients of each transport run in
their own process (asyncio); the figures include the time those processes take to read the
closes, so they are an upper bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import jwt
import websockets

from bench.procs import BenchError, Proc
from bench.targets import Target

TRANSPORTS = ("ws", "sio", "sse")
_CONNECT_BATCH = 50  # handshakes in flight at once
_WAIT_S = 10.0  # a connection not closed by then counts as not closed
_DISCONNECT_FRAME = b"\x81\x0241"  # FIN + text, length 2, "41": Socket.IO disconnect
_REVOKED = b'42["token_revoked"'


def _token(secret: str, user: str) -> str:
    now = int(time.time())
    # iat before the revocation: a user revocation covers tokens issued up to it.
    claims = {"sub": user, "role": "viewer", "iat": now - 5, "exp": now + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


class _Conn:
    """One client connection; ``closed`` resolves with the monotonic time of its end."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.closed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.detail = ""

    def end(self, detail: str) -> None:
        if not self.closed.done():
            self.detail = detail
            self.closed.set_result(time.monotonic())


async def _open_ws(port: int, token: str) -> _Conn:
    conn = _Conn("ws")
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws/events",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=30,
        compression=None,
        ping_interval=None,
    )
    hello = json.loads(await ws.recv())
    if hello.get("type") != "connection_established":
        raise BenchError(f"/ws/events refused the bench user: {hello}")
    # The moment the close frame arrives (websockets' recv() ends only after the closing
    # handshake and the TCP close, which is the library's business, not the hub's).
    received = ws.data_received

    def data_received(data: bytes) -> None:
        received(data)
        if ws.protocol.close_rcvd is not None:
            rcvd = ws.protocol.close_rcvd
            conn.end(f"close frame {rcvd.code} {rcvd.reason}")

    ws.data_received = data_received  # type: ignore[method-assign]

    async def watch() -> None:
        try:
            async for _ in ws:
                pass
        finally:
            conn.end(f"{ws.close_code} {ws.close_reason}")

    conn.task = asyncio.create_task(watch())
    return conn


async def _open_sio(port: int, token: str) -> _Conn:
    conn = _Conn("sio")
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket",
        open_timeout=30,
        compression=None,
        ping_interval=None,
    )
    opened = await ws.recv()
    if not str(opened).startswith("0"):
        raise BenchError(f"Engine.IO open expected, got {opened!r}")
    await ws.send("40" + json.dumps({"token": token}))
    reply = str(await ws.recv())
    if not reply.startswith("40"):
        raise BenchError(f"Socket.IO connect refused the bench user: {reply[:200]}")
    # The moment the disconnect packet arrives: a server frame is unmasked, so a text frame
    # carrying "41" is these bytes on the wire (the message loop below would see it only
    # after the library has dealt with every frame read before it).
    received = ws.data_received

    revoked_seen = [False]

    def data_received(data: bytes) -> None:
        revoked_seen[0] = revoked_seen[0] or _REVOKED in data
        if _DISCONNECT_FRAME in data:
            conn.end("disconnect after token_revoked" if revoked_seen[0] else "disconnect")
        received(data)

    ws.data_received = data_received  # type: ignore[method-assign]

    async def watch() -> None:
        revoked = False
        try:
            async for msg in ws:
                text = str(msg)
                if text == "2":
                    await ws.send("3")
                elif text.startswith('42["token_revoked"'):
                    revoked = True
                elif text.startswith("41"):
                    conn.end("disconnect after token_revoked" if revoked else "disconnect")
                    await ws.close()
                    return
        except websockets.ConnectionClosed:
            pass
        finally:
            conn.end(f"closed {ws.close_code}" + (" after token_revoked" if revoked else ""))

    conn.task = asyncio.create_task(watch())
    return conn


async def _open_sse(port: int, token: str) -> _Conn:
    conn = _Conn("sse")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            "GET /events/stream HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise BenchError(f"SSE refused the bench user: {status!r}")
    # Open once the stream has said connection_established (the connection is registered).
    while b"connection_established" not in await reader.readline():
        if reader.at_eof():
            raise BenchError("SSE stream ended before connection_established")

    async def watch() -> None:
        revoked = False
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line.startswith(b"event: token_revoked"):
                    revoked = True
                elif revoked and line.strip() == b"0":  # the last chunk: the response ended
                    break
        except OSError:
            pass
        finally:
            conn.end("stream ended" + (" after token_revoked" if revoked else ""))
            writer.close()

    conn.task = asyncio.create_task(watch())
    return conn


_OPENERS: dict[str, Callable[[int, str], Awaitable[_Conn]]] = {
    "ws": _open_ws,
    "sio": _open_sio,
    "sse": _open_sse,
}


async def _client(transport: str, port: int, token: str, count: int, pipe: Connection) -> None:
    conns: list[_Conn] = []
    for i in range(0, count, _CONNECT_BATCH):
        batch = min(_CONNECT_BATCH, count - i)
        conns += await asyncio.gather(*(_OPENERS[transport](port, token) for _ in range(batch)))
    pipe.send("ready")
    await asyncio.wait([c.closed for c in conns], timeout=_WAIT_S + 30)
    pipe.send([(c.closed.result() if c.closed.done() else None, c.detail) for c in conns])
    for c in conns:
        if c.task is not None:
            c.task.cancel()
    await asyncio.gather(*(c.task for c in conns if c.task), return_exceptions=True)


def _client_main(transport: str, port: int, token: str, count: int, pipe: Connection) -> None:
    """One client process per transport: the closes are read in parallel, not queued
    behind each other in one event loop (CLOCK_MONOTONIC is the machine's, so the times
    line up with the orchestrator's)."""
    try:
        asyncio.run(_client(transport, port, token, count, pipe))
    except Exception as e:  # reported to the orchestrator, which fails the scenario
        pipe.send(f"error: {type(e).__name__}: {e}")


async def _recv(pipe: Connection, timeout: float) -> Any:
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, pipe.poll, timeout):
        raise BenchError("a revocation client process did not answer")
    msg = pipe.recv()
    if isinstance(msg, str) and msg.startswith("error"):
        raise BenchError(f"revocation client: {msg}")
    return msg


async def _refused(port: int, token: str) -> bool:
    """The revoked token at connect on /ws/events: closed with 4003 ``token revoked``."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/events",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=10,
    ) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        return ws.close_code == 4003 and ws.close_reason == "token revoked"


async def _post_revocation(port: int, admin_token: str, user: str) -> tuple[int, float]:
    """POST /admin/revocations on one instance; (status, seconds to the answer)."""
    body = json.dumps({"user_id": user, "reason": "bench"}).encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            "POST /admin/revocations HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {admin_token}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        + body
    )
    status = await reader.readline()
    elapsed = time.monotonic() - t0
    writer.close()
    return int(status.split()[1]), elapsed


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    s = sorted(values)
    return {
        "p50": s[len(s) // 2],
        "p99": s[min(len(s) - 1, int(len(s) * 0.99))],
        "max": s[-1],
    }


async def measure(
    servers: list[Proc], secret: str, admin_token: str, per_transport: int, rounds: int
) -> dict[str, Any]:
    """``rounds`` revocations, each of a fresh user with its connections on servers[1]."""
    a, b = servers
    ms: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    not_closed: dict[str, int] = dict.fromkeys(TRANSPORTS, 0)
    details: set[str] = set()
    post_ms: list[float] = []
    sent_at: list[float] = []  # wall clock, to line up with the servers' logs
    refused_after = True
    spawn = multiprocessing.get_context("spawn")
    for n in range(rounds):
        user = f"bench-revoked-{n}-{time.monotonic_ns()}"
        token = _token(secret, user)
        clients = []
        try:
            for transport in TRANSPORTS:
                ours, theirs = spawn.Pipe()
                proc = spawn.Process(
                    target=_client_main, args=(transport, b.port, token, per_transport, theirs),
                    daemon=True,
                )
                proc.start()
                clients.append((transport, proc, ours))
            for _, _, pipe in clients:
                await _recv(pipe, 120)  # "ready": every connection of it is open
            await asyncio.sleep(0.5)  # let the connect-time work settle
            t0 = time.monotonic()
            sent_at.append(time.time())
            status, post_s = await _post_revocation(a.port, admin_token, user)
            if status != 201:
                raise BenchError(f"POST /admin/revocations answered {status}")
            post_ms.append(post_s * 1000)
            for transport, _, pipe in clients:
                for at, detail in await _recv(pipe, _WAIT_S + 60):
                    if at is None:
                        not_closed[transport] += 1
                    else:
                        ms[transport].append((at - t0) * 1000)
                        details.add(f"{transport}: {detail}")
            refused_after = refused_after and await _refused(b.port, token)
        finally:
            for _, proc, _ in clients:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    every = [v for t in TRANSPORTS for v in ms[t]]
    total = rounds * per_transport * len(TRANSPORTS)
    return {
        "connections": total,
        "per_transport": per_transport,
        "rounds": rounds,
        "closed": len(every),
        "not_closed": not_closed,
        "close_ms": _pcts(every),
        "close_ms_by_transport": {t: _pcts(ms[t]) for t in TRANSPORTS},
        "post_ms": _pcts(post_ms),
        "posted_at": sent_at,
        "how_closed": sorted(details),
        "refused_after": refused_after,
        "within_1s": bool(every) and max(every) <= 1000,
        "complete": len(every) == total and refused_after,
    }


async def revocation(target: Target, env: Any, sizes: Any) -> list[dict[str, Any]]:
    """Runs once, with the hub-ws target (it covers every transport itself); the other
    targets have no revocation and get no row."""
    from bench.scenarios import _with_servers

    if target.name != "hub-ws":
        return []
    # The connections are one user's: lift the per-user cap for the bench.
    limit = str(sizes.revocation_connections * len(TRANSPORTS) + 10)

    def run(servers: list[Proc]) -> Awaitable[dict[str, Any]]:
        return measure(
            servers, env.secret, env.admin_token, sizes.revocation_connections,
            sizes.revocation_rounds,
        )

    with _env("HUB_MAX_CONNECTIONS_PER_USER", limit):
        return [await _with_servers(target, env, 2, "revocation", run)]


@contextlib.contextmanager
def _env(name: str, value: str) -> Any:
    import os

    old = os.environ.get(name)
    os.environ[name] = value  # spawn() passes the orchestrator's environment on
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def table(results: list[dict[str, Any]]) -> list[str]:
    """The printed lines for the revocation rows."""
    out = []
    for r in results:
        if "error" in r:
            out.append(f"revocation: ERROR {r['error'][:100]}")
            continue
        c = r["close_ms"]
        out.append(
            f"revocation (POST on instance A, {r['connections']} connections of the user on "
            f"B, {r['rounds']} rounds): closed {r['closed']}/{r['connections']}, "
            f"p50 {_ms(c['p50'])} / p99 {_ms(c['p99'])} / max {_ms(c['max'])} ms; "
            f"token refused afterwards: {'yes' if r['refused_after'] else 'NO'}"
        )
        for t, p in r["close_ms_by_transport"].items():
            out.append(
                f"  {t:<4} p50 {_ms(p['p50'])}  p99 {_ms(p['p99'])}  max {_ms(p['max'])} ms"
                + (f"  NOT CLOSED {r['not_closed'][t]}" if r["not_closed"][t] else "")
            )
        out.append(f"  POST answered in p50 {_ms(r['post_ms']['p50'])} ms")
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
