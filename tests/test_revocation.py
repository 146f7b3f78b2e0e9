"""Revocation (issue 15, item 2): POST /admin/revocations on one instance closes the
matching connections of both transports on every instance, and their tokens are refused
at connect afterwards; a token issued after a user or tenant revocation passes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import socketio
import websockets

from tests.conftest import RedisServer, RunningHub, make_settings, make_token, run_hub
from tests.helpers import close_code, connected, recv_type, send_json, wait_until, ws_connect
from tests.sio_helpers import SioClient

ADMIN = make_token("root-admin", "admin", ttl=3600)


class _Sio(SioClient):
    def __init__(self) -> None:
        super().__init__()
        self.revoked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_revoked(data: Any) -> None:
            if not self.revoked.done():
                self.revoked.set_result(data)
        self.client.on("token_revoked", on_revoked)


async def revoke(hub: RunningHub, token: str = ADMIN, **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=hub.url) as client:
        return await client.post("/admin/revocations", json=body,
                                 headers={"Authorization": f"Bearer {token}"})


async def listed(hub: RunningHub) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=hub.url) as client:
        response = await client.get("/admin/revocations",
                                    headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200
    return list(response.json()["revocations"])


async def still_open(ws: websockets.ClientConnection) -> None:
    await send_json(ws, {"action": "ping"})
    assert (await recv_type(ws, "pong"))["type"] == "pong"


async def refused(hub: RunningHub, token: str) -> tuple[int | None, str]:
    ws = await ws_connect(hub.ws_url, token)
    return await close_code(ws)


@pytest.fixture
async def two_hubs(redis_server: RedisServer) -> AsyncIterator[tuple[RunningHub, RunningHub]]:
    # A leeway, so a test can mint a token "issued after" a revocation without waiting
    # for the next second.
    a = make_settings(redis_url=redis_server.url, jwt_leeway_s=3)
    b = a.replace(instance_id=a.instance_id + "-b")
    async with run_hub(a) as first, run_hub(b) as second:
        yield first, second


async def test_user_revocation_reaches_the_other_instance_on_both_transports(
        two_hubs: tuple[RunningHub, RunningHub], caplog: pytest.LogCaptureFixture) -> None:
    a, b = two_hubs
    alice = make_token("alice")
    ws = await connected(b.ws_url, alice)
    bob = await connected(b.ws_url, make_token("bob"))
    sio = _Sio()
    await sio.connect(b.url, auth={"token": alice})
    with caplog.at_level(logging.WARNING, logger="hub.audit"):
        response = await revoke(a, user_id="alice", reason="laptop stolen")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["kind"] == "user_id" and body["value"] == "alice" and body["by"] == "root-admin"
    # Closed on the other instance, on both transports.
    assert await close_code(ws, timeout=20) == (4003, "token revoked")
    assert (await asyncio.wait_for(sio.revoked, 20))["message"] == "token revoked"
    await asyncio.wait_for(sio.disconnected.wait(), 20)
    await still_open(bob)  # another user is untouched
    # The old token is refused at connect, on both instances and both transports.
    assert await refused(b, alice) == (4003, "token revoked")
    assert await refused(a, alice) == (4003, "token revoked")
    again = _Sio()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await again.connect(b.url, auth={"token": alice})
    assert (await asyncio.wait_for(again.connect_error, 20))["data"]["reason"] == "token_revoked"
    # A token issued after the revocation passes.
    newer = make_token("alice", iat=int(body["at"]) + 1)
    fresh = await connected(b.ws_url, newer)
    await still_open(fresh)
    # Listed on both instances; audited with who asked, never a token.
    for hub in (a, b):
        assert [(r["kind"], r["value"]) for r in await listed(hub)] == [("user_id", "alice")]
    lines = [r.getMessage() for r in caplog.records if r.name == "hub.audit"]
    assert any("user_id alice revoked by root-admin" in line for line in lines), lines
    assert any("applied here" in line for line in lines), lines  # the other instance's
    assert not any(alice in line or ADMIN in line for line in lines)
    for conn in (bob, fresh):
        await conn.close()


async def test_user_revocation_ends_sse_streams_on_the_other_instance(
        two_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = two_hubs
    alice = make_token("alice")
    async with httpx.AsyncClient(base_url=b.url, timeout=10) as client, client.stream(
            "GET", "/events/stream", headers={"Authorization": f"Bearer {alice}"}) as stream:
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        async def next_event() -> str:
            async for line in lines:
                if line.startswith("event: "):
                    return line.removeprefix("event: ")
            return ""  # the stream ended
        assert await asyncio.wait_for(next_event(), 10) == "connection_established"
        assert (await revoke(a, user_id="alice")).status_code == 201
        assert await asyncio.wait_for(next_event(), 10) == "token_revoked"
        assert await asyncio.wait_for(next_event(), 10) == ""  # and the stream ends
        again = await client.get("/events/stream",
                                 headers={"Authorization": f"Bearer {alice}"})
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "token_revoked"


async def test_jti_revocation_closes_only_that_token(
        two_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = two_hubs
    first = make_token("carol", jti="token-1")
    second = make_token("carol", jti="token-2")
    ws1 = await connected(b.ws_url, first)
    ws2 = await connected(b.ws_url, second)
    assert (await revoke(a, jti="token-1")).status_code == 201
    assert await close_code(ws1, timeout=20) == (4003, "token revoked")
    await still_open(ws2)
    assert await refused(b, first) == (4003, "token revoked")
    await ws2.close()


async def test_tenant_revocation_closes_the_tenant_and_newer_tokens_pass(
        two_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = two_hubs
    acme = make_token("dave", tenant_id="acme")
    globex = await connected(b.ws_url, make_token("erin", tenant_id="globex"))
    ws = await connected(b.ws_url, acme)
    sio = _Sio()
    await sio.connect(a.url, auth={"token": make_token("frank", tenant_id="acme")})
    response = await revoke(a, tenant_id="acme")
    assert response.status_code == 201
    assert await close_code(ws, timeout=20) == (4003, "token revoked")
    await asyncio.wait_for(sio.revoked, 20)
    await still_open(globex)
    assert await refused(a, acme) == (4003, "token revoked")
    newer = make_token("dave", tenant_id="acme", iat=int(response.json()["at"]) + 1)
    await still_open(await connected(b.ws_url, newer))
    await globex.close()


async def test_a_refresh_with_a_revoked_token_is_refused(
        two_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = two_hubs
    ws = await connected(b.ws_url, make_token("gina", jti="keep"))
    assert (await revoke(a, jti="stolen")).status_code == 201
    # b learns it from a notice on Redis, which may come after this refresh on a loaded
    # machine (nothing orders the two): the refresh is sent once b knows.
    await wait_until(lambda: any(r["value"] == "stolen" for r in b.hub.revocations.listing()),
                     what="the other instance to learn the revocation")
    await send_json(ws, {"action": "refresh", "token": make_token("gina", jti="stolen")})
    assert (await recv_type(ws, "error"))["data"]["code"] == "token_revoked"
    await still_open(ws)
    await ws.close()


async def test_an_instance_started_later_knows_earlier_revocations(
        redis_server: RedisServer) -> None:
    settings = make_settings(redis_url=redis_server.url)
    henry = make_token("henry")  # issued before the revocation
    async with run_hub(settings) as a:
        assert (await revoke(a, user_id="henry")).status_code == 201
    async with run_hub(settings.replace(instance_id="later")) as later:
        assert await refused(later, henry) == (4003, "token revoked")


async def test_admin_endpoint_checks_the_caller_and_the_body() -> None:
    async with run_hub(make_settings()) as hub:
        async with httpx.AsyncClient(base_url=hub.url) as client:
            assert (await client.post("/admin/revocations", json={"user_id": "x"})
                    ).status_code == 401
            cookie = await client.post("/admin/revocations", json={"user_id": "x"},
                                       headers={"Cookie": f"ks_access_token={ADMIN}"})
            assert cookie.status_code == 401  # bearer only: no CSRF through a cookie
        assert (await revoke(hub, make_token("ivan", "viewer"), user_id="x")).status_code == 403
        bodies: list[tuple[dict[str, Any], int]] = [
            ({}, 422), ({"user_id": "a", "jti": "b"}, 422), ({"user_id": ""}, 422),
            ({"user_id": 5}, 422), ({"tenant_id": "x" * 300}, 422),
            ({"user_id": "a", "reason": 3}, 422)]
        for body, code in bodies:
            response = await revoke(hub, **body)
            assert response.status_code == code, (body, response.text)
            assert response.json()["error"]["code"] == "invalid_revocation"
        # The memory backend: revoked in this instance, listed, enforced.
        ws = await connected(hub.ws_url, make_token("judy"))
        assert (await revoke(hub, user_id="judy")).status_code == 201
        assert await close_code(ws, timeout=20) == (4003, "token revoked")
        assert [r["value"] for r in await listed(hub)] == ["judy"]
        # A revoked admin cannot publish or revoke any more either.
        assert (await revoke(hub, user_id="root-admin")).status_code == 201
        response = await revoke(hub, user_id="someone")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "token_revoked"


def test_revocation_expires_with_the_tokens_it_covers() -> None:
    from hub.auth import Principal
    from hub.revocations import Kind, Revocation

    now = time.time()
    revocation = Revocation(kind=Kind.USER_ID, value="kim", at=now, expires_at=now + 10,
                            by="admin", instance_id="i")
    def who(iat: float | None, user: str = "kim") -> Principal:
        return Principal(user, frozenset(), None, now + 60, False, False, issued_at=iat)
    assert revocation.covers(who(now - 5))
    assert revocation.covers(who(None))  # no iat: cannot prove it is newer
    assert not revocation.covers(who(now + 1))
    assert not revocation.covers(who(now - 5, "lee"))
    assert Revocation.from_json(b"{not json") is None
    assert Revocation.from_json(b'{"kind": "nope"}') is None


async def test_hub_revoke_cli(two_hubs: tuple[RunningHub, RunningHub]) -> None:
    import os
    import sys

    from tests.conftest import ROOT, SECRET

    a, b = two_hubs
    ws = await connected(b.ws_url, make_token("mike"))
    env = {k: v for k, v in os.environ.items() if k != "HUB_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", "revoke", "--user", "mike", "--reason", "left",
        "--url", a.url, "--by", "ops-oncall", cwd=ROOT, env={**env, "JWT_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    import orjson

    reply = orjson.loads(out)
    assert (reply["kind"], reply["value"], reply["by"]) == ("user_id", "mike", "ops-oncall")
    assert await close_code(ws, timeout=20) == (4003, "token revoked")
    # A viewer's token is refused, and says where it came from.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", "revoke", "--jti", "x", "--url", a.url, "--token",
        make_token("nina", "viewer"), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert "revocation refused (403)" in err.decode() and "--token" in err.decode()


async def test_admin_connections_lists_every_instance(redis_server: RedisServer) -> None:

    a_settings = make_settings(redis_url=redis_server.url, connections_registry_s=0.2)
    b_settings = a_settings.replace(instance_id=a_settings.instance_id + "-b")
    async with run_hub(a_settings) as a, run_hub(b_settings) as b:
        ws = await connected(a.ws_url, make_token("olga", tenant_id="acme"))
        await send_json(ws, {"action": "subscribe", "event_types": ["threat_detected"]})
        await recv_type(ws, "subscription_updated")
        sio = _Sio()
        await sio.connect(b.url, auth={"token": make_token("pete")})

        async def listing() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=a.url) as client:
                response = await client.get("/admin/connections",
                                            headers={"Authorization": f"Bearer {ADMIN}"})
            assert response.status_code == 200
            return dict(response.json())

        seen: dict[str, Any] = {}

        async def both() -> bool:
            seen.update(await listing())
            return {c["user_id"] for c in seen["connections"]} == {"olga", "pete"}

        deadline = asyncio.get_running_loop().time() + 30
        while not await both():
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.1)  # polling the listing until b's snapshot is in
        by_user = {c["user_id"]: c for c in seen["connections"]}
        assert by_user["olga"]["transport"] == "websocket"
        assert by_user["olga"]["instance_id"] == a_settings.instance_id
        assert by_user["olga"]["tenant_id"] == "acme"
        assert by_user["olga"]["subscription"] == ["threat_detected"]
        assert by_user["pete"]["transport"] == "socketio"
        assert by_user["pete"]["instance_id"] == b_settings.instance_id
        assert by_user["pete"]["subscription"] is None  # every type
        assert set(seen["instances"]) == {a_settings.instance_id, b_settings.instance_id}
        async with httpx.AsyncClient(base_url=a.url) as client:
            viewer = make_token("quinn", "viewer")
            response = await client.get("/admin/connections",
                                        headers={"Authorization": f"Bearer {viewer}"})
            assert response.status_code == 403
        await ws.close()
        await sio.client.disconnect()
    # A stopped instance removes its snapshot.
    assert not redis_server.client().hexists(a_settings.stream_key + ":connections",
                                             b_settings.instance_id)


async def test_expired_and_unreadable_revocations_are_dropped_at_load(
        redis_server: RedisServer) -> None:
    import orjson

    settings = make_settings(redis_url=redis_server.url)
    key = settings.stream_key + ":revocations"
    now = time.time()
    entry = {"kind": "user_id", "value": "old", "at": now - 100, "expires_at": now - 1,
             "by": "x", "instance_id": "gone"}
    live = {**entry, "value": "ursula", "expires_at": now + 600}
    redis = redis_server.client()
    ursula = make_token("ursula", iat=int(now - 200))  # issued before that revocation
    redis.hset(key, mapping={"user_id:old": orjson.dumps(entry), "junk": b"{nope",
                             "user_id:ursula": orjson.dumps(live)})
    async with run_hub(settings) as hub:
        assert await refused(hub, ursula) == (4003, "token revoked")
        assert [r["value"] for r in await listed(hub)] == ["ursula"]
    assert set(redis.hkeys(key)) == {b"user_id:ursula"}
