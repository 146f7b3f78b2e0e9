"""Live reload: SIGHUP (and POST /admin/reload) re-reads key and origin files.

On the real ``hub serve`` command (one process, and ``--workers 2``), with a client on each
transport; a good reload announces ``config_change``, a bad one keeps the old configuration.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection

from hub.config import Settings
from hub.errors import ConfigError
from tests.conftest import (
    SECRET,
    HubProcess,
    RedisServer,
    make_settings,
    make_token,
    run_hub,
    start_hub_process,
    stop_process,
)
from tests.helpers import close_code, connected, recv_json, recv_type, send_json, ws_connect
from tests.sio_helpers import SioClient
from tests.test_workers import connect_until_all_workers, wait_workers_ready

pytestmark = pytest.mark.timeout(90)

OLD = "old-secret-for-the-rotation-window-0123456789"
NEW = "new-secret-for-the-rotation-window-9876543210"
OTHER = "unrelated-secret-never-configured-0123456789"


async def next_status(ws: ClientConnection) -> dict[str, Any]:
    while True:
        message = await recv_json(ws, skip_status=False)
        if message["type"] == "system_status":
            return message


async def sio_status(client: SioClient) -> dict[str, Any]:
    return await client.next_event("system_status")


async def health(hub: HubProcess) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        body: dict[str, Any] = (await http.get(f"{hub.url}/ws/health")).json()
        return body


async def wait_reload_failed(hub: HubProcess) -> dict[str, Any]:
    for _ in range(1000):
        body = await health(hub)
        if body["reload"]["error"]:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError("the bad reload never showed in health")


def files(tmp_path: Path) -> tuple[Path, Path]:
    secrets, origins = tmp_path / "secrets", tmp_path / "origins"
    secrets.write_text(OLD + "\n")
    origins.write_text("# dashboards\nhttps://a.example\n")
    return secrets, origins


async def test_sighup_applies_new_keys_and_origins_and_every_client_sees_it(
        tmp_path: Path) -> None:
    secrets, origins = files(tmp_path)
    hub = start_hub_process({"JWT_SECRET_FILE": str(secrets),
                             "HUB_ALLOWED_ORIGINS_FILE": str(origins)}, tmp_path=tmp_path)
    sio = SioClient()
    try:
        ws = await connected(f"ws://127.0.0.1:{hub.port}/ws/events", make_token(secret=OLD))
        await sio.connect(hub.url, auth={"token": make_token(secret=OLD)})
        await sio.next_other("connection_established")
        refused = await ws_connect(f"ws://127.0.0.1:{hub.port}/ws/events",
                                   make_token(secret=NEW))
        assert await close_code(refused) == (4003, "bad token signature")

        # The rotation: the new secret first (it signs), the old one still accepted.
        secrets.write_text(f"{NEW}\n{OLD}\n")
        origins.write_text("https://b.example\n")
        hub.process.send_signal(signal.SIGHUP)
        for status in (await next_status(ws), await sio_status(sio)):
            assert status["data"]["status"] == "config_change"
            assert status["data"]["changed"] == ["jwt_keys", "allowed_origins"]
        assert OLD not in hub.log() and NEW not in hub.log()

        url = f"ws://127.0.0.1:{hub.port}/ws/events"
        for secret in (NEW, OLD):  # new connections: both secrets of the window
            await (await connected(url, make_token(secret=secret))).close()
        refused = await ws_connect(url, make_token(secret=OTHER))
        assert await close_code(refused) == (4003, "bad token signature")
        await (await connected(url, make_token(secret=NEW), origin="https://b.example")).close()
        refused = await ws_connect(url, make_token(secret=NEW), origin="https://a.example")
        assert await close_code(refused) == (4003, "origin not allowed")
        # `hub token` signs with the first secret of the file.
        minted = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hub", "token", "--sub", "ops"], capture_output=True,
            text=True, check=True, env={"JWT_SECRET_FILE": str(secrets), "PATH": "/usr/bin",
                                        "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert jwt.decode(minted.stdout.strip(), NEW, algorithms=["HS256"])["sub"] == "ops"

        # A bad file: the old configuration stays, the log and health say why.
        secrets.write_text("short\n")
        hub.process.send_signal(signal.SIGHUP)
        body = await wait_reload_failed(hub)
        assert body["status"] == "degraded"
        assert any("JWT_SECRET_FILE secret 1 is too weak" in r for r in body["reasons"])
        assert "reload (SIGHUP) failed" in hub.log() and "short" not in hub.log()
        await (await connected(url, make_token(secret=NEW))).close()
        assert ws.close_code is None  # open connections are never touched

        # Fixed: the next status either client sees is this reload's (none for the bad one).
        secrets.write_text(f"{NEW}\n")
        hub.process.send_signal(signal.SIGHUP)
        for status in (await next_status(ws), await sio_status(sio)):
            assert status["data"]["changed"] == ["jwt_keys"]
        assert (await health(hub))["status"] == "healthy"
        refused = await ws_connect(url, make_token(secret=OLD))  # the window closed
        assert await close_code(refused) == (4003, "bad token signature")
        await ws.close()
    finally:
        await sio.client.disconnect()
        stop_process(hub.process)
    assert "Traceback" not in hub.log()


async def test_post_admin_reload_needs_an_admin_and_reports_a_bad_file(
        tmp_path: Path) -> None:
    secrets, origins = files(tmp_path)
    hub = start_hub_process({"JWT_SECRET_FILE": str(secrets),
                             "HUB_ALLOWED_ORIGINS_FILE": str(origins)}, tmp_path=tmp_path)
    try:
        async with httpx.AsyncClient() as http:
            url = f"{hub.url}/admin/reload"
            viewer = await http.post(url, headers={
                "Authorization": f"Bearer {make_token(secret=OLD)}"})
            assert viewer.status_code == 403
            anonymous = await http.post(url)
            assert anonymous.status_code == 401
            admin = {"Authorization": f"Bearer {make_token('ops', 'admin', secret=OLD)}"}
            same = await http.post(url, headers=admin)
            assert same.status_code == 200 and same.json()["changed"] == []
            origins.write_text("not an origin\n")
            bad = await http.post(url, headers=admin)
            assert bad.status_code == 422
            assert bad.json()["error"]["code"] == "reload_failed"
            assert "HUB_ALLOWED_ORIGINS_FILE entry 'not an origin'" in bad.json()["error"][
                "message"]
            origins.unlink()
            gone = await http.post(url, headers=admin)
            assert gone.status_code == 422 and "cannot read file" in gone.json()["error"][
                "message"]
            origins.write_text("https://c.example\n")
            good = await http.post(url, headers=admin)
            assert good.json()["changed"] == ["allowed_origins"]
            metrics = (await http.get(f"{hub.url}/metrics")).text
            assert 'hub_config_reloads_total{result="ok"} 2.0' in metrics
            assert 'hub_config_reloads_total{result="failed"} 2.0' in metrics
    finally:
        stop_process(hub.process)


async def test_sighup_to_the_supervisor_reaches_every_worker(
        own_redis: RedisServer, tmp_path: Path) -> None:
    secrets, origins = files(tmp_path)
    # connect_until_all_workers signs with the tests' default secret.
    secrets.write_text(f"{OLD}\n{SECRET}\n")
    instance = "reload-wk"
    hub = start_hub_process({"JWT_SECRET_FILE": str(secrets), "HUB_INSTANCE_ID": instance,
                             "HUB_ALLOWED_ORIGINS_FILE": str(origins)},
                            "--workers", "2", "--redis-url", own_redis.url, tmp_path=tmp_path)
    ids = {f"{instance}-w1", f"{instance}-w2"}
    try:
        wait_workers_ready(hub, ids)
        clients = await connect_until_all_workers(hub, ids)
        for ws in clients:  # it subscribed them to threat_detected only
            await send_json(ws, {"action": "subscribe", "event_types": ["system_status"]})
            await recv_type(ws, "subscription_updated")
        # Each worker reloads and announces; with Redis every client hears both.
        secrets.write_text(f"{NEW}\n{SECRET}\n")
        hub.process.send_signal(signal.SIGHUP)
        for ws in clients:
            seen: set[str] = set()
            while seen != ids:
                status = await next_status(ws)
                if status["data"]["status"] == "config_change":
                    assert status["data"]["changed"] == ["jwt_keys"]
                    seen.add(status["data"]["instance_id"])
        for ws in clients:
            await ws.close()
        assert hub.process.poll() is None, hub.log()  # the supervisor and workers survived
    finally:
        stop_process(hub.process)


def test_secret_file_settings_are_checked_at_start(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text(f"{NEW}\n\n# retired next week\n{OLD}\n")
    settings = Settings.from_env({"JWT_SECRET_FILE": str(path)})
    assert settings.hs_secrets == (NEW, OLD) and settings.signing_secret == NEW
    with pytest.raises(ConfigError, match="set only one of JWT_SECRET, JWT_SECRET_FILE"):
        Settings.from_env({"JWT_SECRET": NEW, "JWT_SECRET_FILE": str(path)})
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no secret"):
        Settings.from_env({"JWT_SECRET_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot read file"):
        Settings.from_env({"JWT_SECRET_FILE": str(tmp_path / "missing")})


async def test_a_public_key_file_is_re_read_and_a_broken_one_kept_out(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def key_pair() -> tuple[str, str]:
        private = ec.generate_private_key(ec.SECP256R1())
        return (private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode(),
                private.public_key().public_bytes(
                    serialization.Encoding.PEM,
                    serialization.PublicFormat.SubjectPublicKeyInfo).decode())

    def token(private: str) -> str:
        return make_token(secret=private, algorithm="ES256")

    (old_private, old_public), (new_private, new_public) = key_pair(), key_pair()
    path = tmp_path / "public.pem"
    path.write_text(old_public)
    async with run_hub(make_settings(jwt_secret=None, jwt_public_key=str(path))) as hub:
        watcher = await connected(hub.ws_url, token(old_private))
        path.write_text(new_public)
        result = await hub.hub.reload("test")
        assert (result.ok, result.changed) == (True, ["jwt_keys"])
        status = await next_status(watcher)
        assert status["data"]["changed"] == ["jwt_keys"]
        assert new_public not in str(status)
        await (await connected(hub.ws_url, token(new_private))).close()
        refused = await ws_connect(hub.ws_url, token(old_private))
        assert await close_code(refused) == (4003, "bad token signature")

        path.write_text("-----BEGIN PUBLIC KEY-----\nhalf written")
        result = await hub.hub.reload("test")
        assert not result.ok and result.error == "JWT_PUBLIC_KEY is not a loadable PEM public key"
        await (await connected(hub.ws_url, token(new_private))).close()  # old key kept
        await watcher.close()
