"""JWT_JWKS_URL against a real local JWKS endpoint that rotates its keys."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from hub.config import Settings
from hub.errors import ConfigError
from tests.conftest import free_port, make_settings, run_hub
from tests.helpers import close_code, connected, wait_until, ws_connect

pytestmark = pytest.mark.timeout(60)


class SigningKey:
    def __init__(self) -> None:
        self.kid = uuid.uuid4().hex[:12]
        self._private = ec.generate_private_key(ec.SECP256R1())
        self.pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()

    @property
    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self._private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}

    def token(self, sub: str = "alice", role: str = "viewer", kid: str | None = None) -> str:
        now = int(time.time())
        return jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + 600}, self.pem,
                          algorithm="ES256", headers={"kid": kid or self.kid})


class JwksServer:
    """A tiny real HTTP server serving ``keys`` as a JWKS; counts the fetches."""

    def __init__(self, port: int | None = None) -> None:
        self.keys: list[SigningKey] = []
        self.hits = 0
        # When set, a fetch waits for `gate` before it is answered.
        self.gate: threading.Event | None = None
        self.port = port or free_port()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                if owner.gate is not None:
                    owner.gate.wait(30)
                body = json.dumps({"keys": [k.jwk for k in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys.append(SigningKey())
    server.start()
    yield server
    server.stop()


def jwks_settings(server: JwksServer, **overrides: Any) -> Settings:
    return make_settings(jwt_secret=None, jwt_jwks_url=server.url, **overrides)


async def accepted(url: str, token: str) -> bool:
    # The handshake waits for any JWKS refetch its kid needs: give it the fetch's time.
    ws = await ws_connect(url, token, open_timeout=30)
    try:
        first = await asyncio.wait_for(ws.recv(), 10)
        return bool(json.loads(first)["type"] == "connection_established")
    except Exception:
        return False
    finally:
        await ws.close()


async def test_a_rotated_in_key_is_accepted_without_restart(jwks_server: JwksServer) -> None:
    old = jwks_server.keys[0]
    # The smallest interval: the refetch for the new kid is never held back here (the
    # rate limit has its own test below).
    async with run_hub(jwks_settings(jwks_server, jwks_min_refetch_s=1e-6)) as hub:
        assert jwks_server.hits == 1  # fetched at start-up
        assert await accepted(hub.ws_url, old.token())

        new = SigningKey()
        jwks_server.keys = [old, new]  # the provider publishes the next key
        ws = await connected(hub.ws_url, new.token())  # a new kid: refetched, accepted
        assert jwks_server.hits == 2
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{hub.url}/events", json={
                "type": "system_status", "data": {"status": "degraded"}},
                headers={"Authorization": f"Bearer {new.token('ops', 'admin')}"})
        assert reply.status_code == 202

        # The old key retired: a reload refetches at once, and its tokens are refused.
        jwks_server.keys = [new]
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{hub.url}/admin/reload", headers={
                "Authorization": f"Bearer {new.token('ops', 'admin')}"})
        assert reply.status_code == 200
        assert reply.json()["changed"] == ["jwt_keys"]
        refused = await ws_connect(hub.ws_url, old.token())
        assert await close_code(refused) == (4003, "token signed by an unknown key")
        assert await accepted(hub.ws_url, new.token())
        await ws.close()


async def test_a_slow_fetch_does_not_block_the_event_loop(jwks_server: JwksServer) -> None:
    # The fetch is held until the gate opens: a fetch timeout (5 s by default) that a
    # stalled machine could reach before then would fail the handshake instead.
    async with run_hub(jwks_settings(jwks_server, jwks_min_refetch_s=1e-6,
                                     jwks_timeout_s=30)) as hub:
        new = SigningKey()
        jwks_server.keys.append(new)
        jwks_server.gate = threading.Event()
        connecting = asyncio.create_task(accepted(hub.ws_url, new.token()))
        await wait_until(lambda: jwks_server.hits == 2, what="the refetch to start")
        # The fetch hangs in the JWKS server; the hub still answers (same event loop).
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{hub.url}/ws/health")).status_code == 200
        assert not connecting.done()  # still waiting for its key
        jwks_server.gate.set()
        assert await connecting


async def test_a_flood_of_unknown_kids_costs_at_most_one_fetch_per_interval(
        jwks_server: JwksServer) -> None:
    key = jwks_server.keys[0]
    async with run_hub(jwks_settings(jwks_server, jwks_min_refetch_s=3600,
                                      refusal_limit=100)) as hub:
        assert jwks_server.hits == 1  # the start-up fetch opens the interval
        async with httpx.AsyncClient() as http:
            replies = await asyncio.gather(*(
                http.post(f"{hub.url}/events",
                          json={"type": "system_status", "data": {"status": "x"}},
                          headers={"Authorization":
                                   f"Bearer {key.token('ops', 'admin', kid=f'made-up-{n}')}"})
                for n in range(60)))
        assert {r.status_code for r in replies} == {401}
        assert {r.json()["error"]["code"] for r in replies} == {"unknown_key"}
        for n in range(10):  # and over WebSocket
            ws = await ws_connect(hub.ws_url, key.token(kid=f"ws-made-up-{n}"))
            assert (await close_code(ws))[0] == 4003
        # 70 made-up kids within one interval: no fetch beyond the one that opened it.
        assert jwks_server.hits <= 2
        assert hub.hub.jwks.fetches == jwks_server.hits
        assert await accepted(hub.ws_url, key.token())  # the real key still works


async def test_an_unreachable_endpoint_keeps_the_cached_keys(jwks_server: JwksServer) -> None:
    key = jwks_server.keys[0]
    async with run_hub(jwks_settings(jwks_server, jwks_min_refetch_s=1e-6)) as hub:
        assert await accepted(hub.ws_url, key.token())
        jwks_server.stop()
        # An unknown kid makes the hub try the endpoint, which is gone.
        ws = await ws_connect(hub.ws_url, SigningKey().token())
        assert await close_code(ws) == (4003, "token signed by an unknown key")
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{hub.url}/ws/health")).json()
        assert health["status"] == "degraded"
        assert health["jwks"]["ok"] is False and health["jwks"]["keys"] == 1
        assert any(r.startswith("jwks: endpoint unreachable, 1 cached keys in force")
                   for r in health["reasons"])
        assert await accepted(hub.ws_url, key.token())  # the cached key stays in force
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{hub.url}/metrics")).text
        assert 'hub_jwks_fetches_total{result="ok"} 1.0' in metrics
        assert 'hub_jwks_fetches_total{result="failed"} 1.0' in metrics


async def test_start_up_with_the_endpoint_down_serves_degraded_until_it_answers() -> None:
    server = JwksServer()
    key = SigningKey()
    server.keys.append(key)
    async with run_hub(jwks_settings(server, jwks_min_refetch_s=1e-6)) as hub:
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{hub.url}/ws/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["jwks"]["keys"] == 0
        ws = await ws_connect(hub.ws_url, key.token())
        assert await close_code(ws) == (4003, "token signed by an unknown key")
        server.start()
        try:
            assert await accepted(hub.ws_url, key.token())
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{hub.url}/ws/health")
            assert health.json()["status"] == "healthy"
        finally:
            server.stop()


def test_jwks_url_is_exclusive_with_the_other_key_settings() -> None:
    with pytest.raises(ConfigError, match="set only one of JWT_SECRET, JWT_JWKS_URL"):
        Settings.from_env({"JWT_SECRET": "x" * 40, "JWT_JWKS_URL": "https://sso/jwks"})
    with pytest.raises(ConfigError, match="http:// or https://"):
        Settings.from_env({"JWT_JWKS_URL": "file:///etc/passwd"})
    with pytest.raises(ConfigError, match="asymmetric"):
        Settings.from_env({"JWT_JWKS_URL": "https://sso/jwks", "JWT_ALGORITHMS": "HS256"})
    assert Settings.from_env({"JWT_JWKS_URL": "https://sso/jwks"}).algorithms == (
        "RS256", "ES256")
