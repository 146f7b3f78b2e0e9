"""The attack suite (issue 10): each way found to make hub hold memory, descriptors or
slots for nobody, or to slip past a check, reproduced against real ``hub serve`` processes,
asserting the bound — memory growth and descriptor counts of the server process (from
/proc), the refusal code, and that health still answers.

The bounds themselves are described in the README's "Security" section.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets

from hub.auth import TokenVerifier
from hub.config import Settings
from hub.events import Event
from hub.logs import redact
from hub.tail import format_line, json_line
from tests.conftest import SECRET, HubProcess, make_token, start_hub_process, stop_process
from tests.helpers import client_frame, close_code, recv_type, stalled_client, wait_until

MB = 1024 * 1024


# -- a `hub serve` process with its /proc ------------------------------------------------
class Served(HubProcess):
    """A ``hub serve`` process (conftest's) with what the attacks measure in /proc."""

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/events"

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def status(self, field: str) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        assert match, field
        return int(match.group(1)) * 1024

    def holds(self, client_port: int) -> bool:
        """Whether the server still has a descriptor for its connection from
        ``client_port`` (its socket's inode, from /proc/net/tcp, among its fds)."""
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == self.port
                    and int(remote.split(":")[1], 16) == client_port):
                inodes.add(fields[9])
        fd_dir = f"/proc/{self.process.pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                    return True
        return False

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(self.url + "/ws/health")
        assert response.status_code == 200
        return dict(response.json())


@contextlib.contextmanager
def serve(tmp_path: Path, env: dict[str, str], *, nofile: int | None = None,
          log_level: str = "warning") -> Iterator[Served]:
    def limit() -> None:  # in the child, before exec
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    # Many refusals from 127.0.0.1 on purpose: each must show its own close code, not the
    # early 403 that repeated refusals from one address get (tests/test_proxy_compat.py).
    hub = start_hub_process({"JWT_SECRET": SECRET, "HUB_REFUSAL_LIMIT": "100000", **env},
                            tmp_path=tmp_path, log_level=log_level, preexec_fn=limit,
                            start_timeout=30)
    try:
        yield Served(hub.process, hub.port, hub.log_path)
    finally:
        stop_process(hub.process)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """256 descriptors, a 1 s request deadline and close timeout; up to 200 headers (so
    that the WebSocket parser's own limit of 128 can be reached)."""
    with serve(tmp_path_factory.mktemp("tight"), {
        "HUB_HANDSHAKE_TIMEOUT_S": "1", "HUB_CLOSE_TIMEOUT_S": "1", "HUB_MAX_HEADERS": "200",
    }, nofile=256) as served:
        yield served


# -- raw HTTP ----------------------------------------------------------------------------
async def raw(port: int, head: bytes, body_chunks: Any = (), *,
              local: str | None = None) -> bytes:
    """Send ``head`` then ``body_chunks`` while reading; return everything read until EOF
    or reset (what a client that keeps sending would see)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(local, 0) if local else None)
    received = bytearray()

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    reading = asyncio.create_task(read())
    try:
        writer.write(head)
        for chunk in body_chunks:
            if reading.done():
                break
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    await asyncio.wait_for(reading, 30)
    writer.close()
    return bytes(received)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


WS_HEAD = (b"GET /ws/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
           base64.b64encode(os.urandom(16)) + b"\r\n")


# -- 10.2: header and body sizes -------------------------------------------------------
async def test_a_100_mb_header_gets_431_at_once_and_costs_no_memory(tight: Served) -> None:
    peak_before = tight.status("VmHWM")
    head = b"GET /ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    response = await raw(tight.port, head, (b"a" * MB for _ in range(100)))
    growth = tight.status("VmHWM") - peak_before
    print(f"\npeak RSS growth after a 100 MB header: {growth / MB:.1f} MB")
    assert status_of(response) == 431
    assert growth < 16 * MB  # httptools used to buffer all of it
    assert (await tight.health())["status"] == "healthy"


@pytest.mark.parametrize("head", [
    b"GET /ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Line: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Many: 1\r\n" * 201 + b"\r\n",
    # A WebSocket upgrade with an 8 KB header line: answered now, not "431" in the log
    # and nothing on the wire.
    WS_HEAD + b"X-Line: " + b"a" * 8190 + b"\r\n\r\n",
    # 129 headers: over the WebSocket parser's own limit (128), under hub's (200 here).
    WS_HEAD + b"X-Many: 1\r\n" * 129 + b"\r\n",
], ids=["long-line", "many-headers", "ws-long-line", "ws-many-headers"])
async def test_oversized_headers_are_answered_431_and_closed(tight: Served, head: bytes) -> None:
    response = await raw(tight.port, head)  # returns at EOF: the socket was closed
    assert status_of(response) == 431


@pytest.mark.parametrize("head,chunks", [
    (b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 104857600\r\n\r\n", ()),
    (b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
     b"Authorization: Bearer " + make_token("root", "admin").encode() + b"\r\n\r\n",
     (b"10000\r\n" + b"a" * 0x10000 + b"\r\n" for _ in range(1600))),
    (b"POST /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     b"Content-Length: 71680\r\n\r\n", (b"a" * 71680,)),
], ids=["declared", "chunked", "polling-post"])
async def test_oversized_bodies_get_413_at_once(tight: Served, head: bytes, chunks: Any) -> None:
    peak_before = tight.status("VmHWM")
    response = await raw(tight.port, head, chunks)
    assert status_of(response) == 413
    assert tight.status("VmHWM") - peak_before < 16 * MB
    assert (await tight.health())["status"] == "healthy"


# -- 10.2: nothing held for the unauthenticated ------------------------------------------
async def test_idle_connections_are_capped_and_time_out(tight: Served) -> None:
    baseline = tight.fds()
    idle = [await asyncio.open_connection("127.0.0.1", tight.port) for _ in range(300)]
    try:
        held = tight.fds() - baseline
        # Under 256 descriptors, 300 idle sockets used to starve health and real clients.
        assert (await tight.health())["status"] == "healthy"
        admin = await websockets.connect(tight.ws_url, additional_headers={
            "Authorization": f"Bearer {make_token('root', 'admin')}"})
        await recv_type(admin, "connection_established")
        await admin.close()
        # Each one is answered (408 after the deadline, or 503 at once over the cap), then
        # closed by the server.
        answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 30) for r, _ in idle))
        assert {status_of(a) for a in answers} <= {408, 503}
        await wait_until(lambda: tight.fds() <= baseline + 2, 15, "descriptors to be freed")
        print(f"\nserver descriptors: {held} held by 300 idle connections (cap: half the "
              f"limit), {tight.fds() - baseline} after the deadline")
        assert held <= 128 + 8
    finally:
        for _, writer in idle:
            writer.close()


async def test_slowloris_headers_get_408(tight: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
    writer.write(b"GET /ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:  # a byte at a time, each well inside any per-read timeout
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        trickling.cancel()
        writer.close()
    assert status_of(answer) == 408


# A waiting connection may be dropped for a newcomer after half of this (6 s), and gets
# its own 408 at the end of it: the 6 s between are the window the eviction below must
# land in, wide enough for a loaded machine's stalls.
PER_ADDRESS_DEADLINE_S = 12


@pytest.fixture(scope="module")
def per_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("addr"), {
        "HUB_MAX_PENDING_PER_ADDRESS": "5", "HUB_TRUSTED_PROXIES": "127.0.0.3",
        "HUB_HANDSHAKE_TIMEOUT_S": str(PER_ADDRESS_DEADLINE_S),
    }) as served:
        yield served


async def test_pending_connections_are_capped_per_address(per_address: Served) -> None:
    port = per_address.port
    request = b"GET /ws/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    try:
        # Over the cap, a newcomer from the same address is never refused (thousands of
        # clients behind one load balancer must all get in) ...
        assert status_of(await raw(port, request)) == 200
        # ... but once the address's oldest waiting connection has waited half the request
        # deadline, a newcomer takes its place: it is answered 503 before its own 408.
        first_reader = opened[0][0]
        evicted = asyncio.ensure_future(first_reader.read())
        # By the deadline it has been answered in any case (408 if never dropped: the
        # status check below names that failure).
        deadline = time.monotonic() + PER_ADDRESS_DEADLINE_S + 10
        while not evicted.done():
            assert time.monotonic() < deadline, "the oldest connection was never dropped"
            opened.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.wait([evicted], timeout=0.25)
        assert status_of(evicted.result()) == 503
        # Other addresses get in, and a configured proxy is not capped at all.
        others = [await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
                  for ip in ["127.0.0.2"] + ["127.0.0.3"] * 20]
        opened += others
        assert status_of(await raw(port, request, local="127.0.0.3")) == 200
        assert status_of(await raw(port, request, local="127.0.0.2")) == 200
    finally:
        for _, writer in opened:
            writer.close()
    # Closed connections free their places.
    await wait_until(lambda: per_address.fds() < 40, 10, "connections to close")
    async with httpx.AsyncClient() as client:
        assert (await client.get(per_address.url + "/ws/health")).status_code == 200


# -- 10.2: peers that stop reading are dropped -----------------------------------------
async def _publish_big(url: str, count: int) -> None:
    admin = make_token("root", "admin")
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(count):
            response = await client.post(url + "/events", headers={
                "Authorization": f"Bearer {admin}"}, json={
                "type": "system_status", "data": {"status": "online", "message": "x" * 50_000,
                                                  "n": i}})
            assert response.status_code == 202


async def _reconnects(served: Served, token: str) -> None:
    """With HUB_MAX_CONNECTIONS_PER_USER=1, a new connection gets in only once the stalled
    one's slot is free."""
    ws = await websockets.connect(served.ws_url,
                                  additional_headers={"Authorization": f"Bearer {token}"})
    try:
        await recv_type(ws, "connection_established")
    finally:
        await ws.close()


async def _websockets_opened(served: Served) -> float:
    """/ws/events connections the server has opened (hub_frame_path_connections_total, one
    per connection, whatever its path), open or not."""
    async with httpx.AsyncClient(timeout=10) as http:
        metrics = (await http.get(served.url + "/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("hub_frame_path_connections_total{")
               and 'transport="websocket"' in line)


@pytest.mark.parametrize("case", ["keepalive-timeout", "slow-consumer-4008"])
async def test_a_peer_that_stops_reading_is_dropped(tmp_path: Path, case: str) -> None:
    env = {"HUB_CLOSE_TIMEOUT_S": "1", "HUB_MAX_CONNECTIONS_PER_USER": "1"}
    if case == "keepalive-timeout":
        env |= {"HUB_PING_INTERVAL_S": "1", "HUB_PING_TIMEOUT_S": "1"}
    else:
        env |= {"HUB_OUTBOX_LIMIT": "5"}
    with serve(tmp_path, env) as served:
        await served.health()
        baseline = served.fds()
        token = make_token("mallory", "viewer")
        _reader, writer = await stalled_client(served.port, token)
        try:
            if case == "keepalive-timeout":
                # Its keepalive may drop it 2 s after the handshake, before a loaded
                # machine gets to ask whether it is open: that it was opened is what counts.
                assert await _websockets_opened(served) == 1
            else:
                assert (await served.health())["active_connections"] == 1
            # Enough to fill the socket buffers, so a plain close() would wait forever.
            await _publish_big(served.url, 120)
            deadline = time.monotonic() + 30
            while (await served.health())["active_connections"] != 0:
                assert time.monotonic() < deadline, "the stalled connection was never dropped"
                await asyncio.sleep(0.1)
            await wait_until(lambda: served.fds() <= baseline, 10,
                             "the stalled connection's descriptor to be freed")
            await _reconnects(served, token)  # its per-user slot is free again
        finally:
            writer.close()


async def test_replies_to_a_client_that_never_reads_are_bounded_too(tmp_path: Path) -> None:
    """Pings answered into an outbox nobody drains: the replies may take the outbox to
    twice its limit (hub.connection.Outbox.ceiling), then the client is a slow consumer
    (4008), not a leak of a few hundred bytes a message for as long as it stays."""
    env = {"HUB_CLOSE_TIMEOUT_S": "1", "HUB_OUTBOX_LIMIT": "5",
           "HUB_CLIENT_RATE": "1000000", "HUB_CLIENT_BURST": "1000000"}
    with serve(tmp_path, env) as served:
        _reader, writer = await stalled_client(served.port, make_token("mallory", "viewer"))
        ping = client_frame('{"action": "ping"}')
        try:
            sent = 0
            while (await served.health())["active_connections"] != 0:
                # Far more pongs than the socket buffers on both sides hold (~70 bytes
                # each) before the outbox has to keep them.
                assert sent < 400_000, "replies to a client that never reads were never cut"
                writer.write(ping * 2_000)
                await writer.drain()
                sent += 2_000
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(served.url + "/metrics")).text
            assert 'hub_slow_consumer_disconnects_total{transport="websocket"} 1.0' in metrics
        finally:
            writer.close()


# -- 10.6: one Origin check, forwarded headers only from proxies -----------------------
@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("plain"), {"HUB_TRUSTED_PROXIES": "127.0.0.3"},
               log_level="info") as served:
        yield served


async def _ws_origin(served: Served, origin: str, headers: dict[str, str] | None = None,
                     local: str | None = None) -> bool:
    token = make_token()
    try:
        ws = await websockets.connect(
            served.ws_url, origin=origin,  # type: ignore[arg-type]
            additional_headers={"Authorization": f"Bearer {token}", **(headers or {})},
            local_addr=(local, 0) if local else None)
    except websockets.InvalidStatus:
        return False
    try:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return bool(message["type"] == "connection_established")
    except websockets.ConnectionClosed:
        return False
    finally:
        await ws.close()


async def _sio_origin(served: Served, origin: str, headers: dict[str, str] | None = None,
                      local: str | None = None) -> bool:
    transport = httpx.AsyncHTTPTransport(local_address=local) if local else None
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        response = await client.get(served.url + "/socket.io/?EIO=4&transport=polling",
                                    headers={"Origin": origin, **(headers or {})})
    return response.status_code == 200


@pytest.mark.parametrize("origin_of,allowed", [
    (lambda port: f"http://127.0.0.1:{port}", True),
    (lambda port: f"HTTP://127.0.0.1:{port}/", True),  # case and a trailing slash
    (lambda port: f"https://127.0.0.1:{port}", False),  # another scheme
    (lambda port: f"http://127.0.0.1:{port + 1}", False),
    (lambda port: f"http://127.0.0.1:{port}/path", False),
    (lambda port: "null", False),
], ids=["same", "normalised", "scheme", "port", "path", "null"])
async def test_both_transports_compare_origins_the_same_way(plain: Served, origin_of: Any,
                                                            allowed: bool) -> None:
    origin = origin_of(plain.port)
    assert await _ws_origin(plain, origin) is allowed
    assert await _sio_origin(plain, origin) is allowed


async def test_forwarded_host_counts_only_from_a_trusted_proxy(plain: Served) -> None:
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    # From anyone: ignored (Socket.IO used to accept it).
    assert not await _ws_origin(plain, "https://evil.example", forged)
    assert not await _sio_origin(plain, "https://evil.example", forged)
    # From the configured proxy: the public origin it reports is the hub's.
    assert await _ws_origin(plain, "https://evil.example", forged, local="127.0.0.3")
    assert await _sio_origin(plain, "https://evil.example", forged, local="127.0.0.3")
    rfc = {"Forwarded": 'for=1.2.3.4;host="dash.example";proto=https'}
    assert await _sio_origin(plain, "https://dash.example", rfc, local="127.0.0.3")
    assert not await _sio_origin(plain, "https://dash.example", rfc)


# -- 10.6: strict tokens -----------------------------------------------------------------
def _hs(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _raw_token(payload: str) -> str:
    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    token = f"{head}.{body}"
    import hashlib
    import hmac

    sig = hmac.new(SECRET.encode(), token.encode(), hashlib.sha256).digest()
    return token + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


NOW = int(time.time())
BAD_TOKENS = {
    "exp-10**400": _raw_token(f'{{"sub":"m","exp":{10**400}}}'),
    "exp-1e400": _raw_token('{"sub":"m","exp":1e400}'),
    "exp-string": _hs({"sub": "m", "exp": str(NOW + 600)}),
    "exp-bool": _raw_token('{"sub":"m","exp":true}'),
    "nbf-string": _hs({"sub": "m", "exp": NOW + 600, "nbf": "0"}),
    "iat-huge": _raw_token(f'{{"sub":"m","exp":{NOW + 600},"iat":1e300}}'),
    "no-exp": _hs({"sub": "m"}),
    "lifetime-over-max": _hs({"sub": "m", "iat": NOW, "exp": NOW + 365 * 86400}),
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
async def test_bad_time_claims_are_refused_with_4003_and_401(plain: Served, name: str) -> None:
    token = BAD_TOKENS[name]
    ws = await websockets.connect(plain.ws_url,
                                  additional_headers={"Authorization": f"Bearer {token}"})
    code, _reason = await close_code(ws)
    assert code == 4003
    async with httpx.AsyncClient() as client:
        response = await client.post(plain.url + "/events",
                                     headers={"Authorization": f"Bearer {token}"},
                                     json={"type": "system_status", "data": {"status": "online"}})
    assert response.status_code == 401
    assert response.json()["error"]["code"] in {"wrong_claims", "malformed_token"}


def test_an_es256_header_against_an_rsa_key_is_a_reason_not_a_crash() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    verifier = TokenVerifier(Settings(jwt_public_key=public.decode()))
    head = base64.urlsafe_b64encode(b'{"alg":"ES256"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "m", "exp": NOW + 60}).encode()).rstrip(b"=").decode()
    from hub.errors import AuthError

    with pytest.raises(AuthError) as refused:
        verifier.verify(f"{head}.{body}.AAAA")
    assert refused.value.code == "bad_algorithm"


# -- 10.6: no session ids in the logs ----------------------------------------------------
async def test_engineio_sids_never_reach_the_access_log(plain: Served) -> None:
    redacted = plain.log().count("sid=[redacted]")
    async with httpx.AsyncClient(timeout=10) as client:
        opened = await client.get(plain.url + "/socket.io/?EIO=4&transport=polling")
        sid = json.loads(opened.text[1:])["sid"]
        await client.post(plain.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}",
                          content=b'40{"token":"' + make_token().encode() + b'"}')
        await client.get(plain.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}")
    # Both requests that carried the sid (the POST and the second GET) are logged.
    await wait_until(lambda: plain.log().count("sid=[redacted]") >= redacted + 2, 10,
                     "the access log lines")
    assert sid not in plain.log()
    assert redact("GET /socket.io/?EIO=4&sid=abc&transport=polling") == \
        "GET /socket.io/?EIO=4&sid=[redacted]&transport=polling"


# -- 10.4: hub tail shows no control characters ------------------------------------------
HOSTILE = ("\x1b]0;pwned\x07\x1b]52;c;ZWNobyBoaQ==\x07\x1b[2J\rsystem_status ONLINE all clear"
           "\x9b31m\x85\u202e\x7f")


@pytest.mark.parametrize("colour", [False, True])
def test_tail_lines_carry_no_control_characters_from_event_data(colour: bool) -> None:
    event = Event(id="1700000000000-0", type="system_status",
                  timestamp="2025-01-15T10:30:00.123Z", tenant=HOSTILE,
                  data={"status": HOSTILE, "instance_id": HOSTILE, "message": HOSTILE})
    line = format_line(event, colour)
    # hub tail's own colour codes are the only escapes on the line.
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", line) if colour else line
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e]", stripped), repr(stripped)
    assert "\\x1b]0;pwned" in line and "\\x9b" in line and "\\x0d" in line


def test_tail_json_is_pure_json_without_raw_control_characters() -> None:
    envelope = {"id": "1-0", "type": "system_status", "data": {"message": HOSTILE}}
    line = json_line(envelope)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", line)
    assert json.loads(line) == envelope



# -- 10.9: a malformed packet costs one log line, not a traceback each ---------------------
async def test_malformed_socketio_packets_do_not_flood_the_log(plain: Served) -> None:
    """A malformed packet on a session that never connected a namespace ends that session
    (hub/transports/socketio.py); 30 of them, each on a session of its own, cost no
    traceback and a bounded number of log lines."""
    before = len(plain.log().splitlines())
    async with httpx.AsyncClient(base_url=plain.url, timeout=10) as client:
        for _ in range(30):
            opened = await client.get("/socket.io/?EIO=4&transport=polling")
            sid = json.loads(opened.text[1:])["sid"]
            response = await client.post(f"/socket.io/?EIO=4&transport=polling&sid={sid}",
                                         content=b'42["x"')
            assert response.status_code in (200, 400)
            # The session is gone: engine.io answers its sid as unknown.
            again = await client.get(f"/socket.io/?EIO=4&transport=polling&sid={sid}")
            assert again.status_code == 400
    log = plain.log()
    assert "Traceback" not in log, log[-3000:]
    # Besides the access log (a line per request in any case): at most a line per session.
    hub_lines = [line for line in log.splitlines()[before:] if " HTTP/1.1\" " not in line]
    assert len(hub_lines) <= 30 + 5, hub_lines[-20:]
    assert (await plain.health())["status"] == "healthy"


async def test_a_client_that_never_reads_its_responses_is_dropped(tight: Served) -> None:
    """Pipelined requests whose responses are never read used to hold the connection (and
    the response task) for as long as the client kept it open."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", tight.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    port = sock.getsockname()[1]
    try:
        # One request answered in full first: the server has accepted the connection, so
        # the check below sees its descriptor (not a connection still in the backlog).
        await loop.sock_sendall(sock, b"GET /ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answered = b""
        while not re.search(rb"\r\n\r\n\{.*\}$", answered, re.S):
            answered += await loop.sock_recv(sock, 65536)
        assert tight.holds(port)
        request = b"GET /dashboard/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with contextlib.suppress(ConnectionError):
            await loop.sock_sendall(sock, request * 400)  # ~23 MB of responses, never read
        await wait_until(lambda: not tight.holds(port), 30, "the stalled connection to go")
    finally:
        sock.close()
    assert (await tight.health())["status"] == "healthy"


async def test_the_second_request_on_a_connection_is_bounded_too(tight: Served) -> None:
    first = b"GET /ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    second = b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 104857600\r\n\r\n"
    response = await raw(tight.port, first + second)
    assert status_of(response) == 200
    assert b"HTTP/1.1 413 " in response


@pytest.mark.parametrize("value,expected", [
    ("https://Dash.Example.com", ("https", "dash.example.com", 443)),
    ("https://dash.example.com:443/", ("https", "dash.example.com", 443)),
    ("http://[::1]:8000", ("http", "::1", 8000)),
    ("wss://h", ("https", "h", 443)),
    ("null", None), ("https://h/x", None), ("https://u@h", None), ("https://h:99999", None),
    ("ftp://h", None), ("", None),
])
def test_origins_are_normalised_before_comparison(value: str, expected: Any) -> None:
    from hub.auth import normalise_origin

    assert normalise_origin(value) == expected
