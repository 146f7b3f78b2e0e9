"""The `hub` command as a user runs it: real processes, real output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.conftest import (
    SECRET,
    RedisServer,
    free_port,
    make_settings,
    make_token,
    run_hub,
    start_hub_process,
)
from tests.helpers import THREAT, connected, recv_json, recv_type, ws_connect
from tests.sio_helpers import SioClient


def _env(env: dict[str, str] | None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("JWT_", "HUB_", "REDIS_URL"))}
    return {**clean, **(env or {})}


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub", *args], capture_output=True, text=True,
                          env=_env(env), timeout=timeout)


async def run_cli_async(*args: str, env: dict[str, str] | None = None
                        ) -> subprocess.CompletedProcess[str]:
    """For hubs served in this test's event loop, which a blocking call would starve."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", *args, env=_env(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


@pytest.mark.parametrize(("env", "args", "message"), [
    ({}, [], "no token key: set JWT_SECRET"),
    ({"JWT_SECRET": "short"}, [], "JWT_SECRET is too weak: 5 bytes"),
    ({"JWT_SECRET": SECRET, "REDIS_URL": "http://x"}, [], "REDIS_URL must start with"),
    ({"JWT_SECRET": SECRET}, ["--redis-url", "redis://127.0.0.1:1/0"], "cannot reach Redis"),
    ({"JWT_SECRET": SECRET, "HUB_HISTORY_SIZE": "lots"}, [], "HUB_HISTORY_SIZE has an invalid"),
    ({"JWT_SECRET": SECRET, "HUB_OUTBOX_LIMIT": "0"}, [], "HUB_OUTBOX_LIMIT must be a positive"),
    ({"JWT_SECRET": SECRET, "HUB_ALLOWED_ORIGINS": "dash.example.com"}, [],
     "is not an origin"),
    ({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "none"}, [], "unsupported"),
    ({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "RS256"}, [], "JWT_SECRET works only with HS"),
    ({"JWT_PUBLIC_KEY": "/nonexistent.pem"}, [], "cannot read key file"),
    ({"JWT_SECRET": SECRET}, ["--workers", "2"], "--workers needs REDIS_URL"),
])
def test_bad_configuration_stops_with_one_clear_line(env: dict[str, str], args: list[str],
                                                     message: str) -> None:
    result = run_cli("serve", "--port", str(free_port()), *args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hub: error: ")
    assert message in lines[0]
    assert SECRET not in result.stderr


def test_token_prints_a_token_the_hub_accepts() -> None:
    result = run_cli("token", "--sub", "alice", "--role", "admin", "--tenant", "acme",
                     "--ttl", "2h", env={"JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["role"], claims["tenant_id"]) == ("alice", "admin", "acme")
    assert claims["exp"] - claims["iat"] == 7200


def test_token_without_a_key_fails_clearly() -> None:
    result = run_cli("token", "--sub", "alice")
    assert result.returncode == 2
    assert "no token key" in result.stderr


async def test_publish_through_redis_without_a_server_url(redis_server: RedisServer) -> None:
    settings = make_settings(redis_url=redis_server.url)
    async with run_hub(settings) as running:
        ws = await connected(running.ws_url, make_token())
        result = await run_cli_async("publish", "threat_detected", "--data", json.dumps(THREAT),
                         env={"REDIS_URL": redis_server.url,
                              "HUB_STREAM_KEY": settings.stream_key})
        assert result.returncode == 0, result.stderr
        published = json.loads(result.stdout)
        assert (await recv_json(ws))["id"] == published["id"]
        await ws.close()


async def test_publish_errors_name_the_field(memory_hub: object) -> None:
    url = memory_hub.url  # type: ignore[attr-defined]
    bad = await run_cli_async("publish", "threat_detected", "--data", '{"severity": "high"}',
                              "--url", url, env={"JWT_SECRET": SECRET})
    assert bad.returncode == 1
    # Every field at fault, not only the first.
    assert "fields: data.attack_type, data.confidence, data.action_taken" in bad.stderr
    assert "Traceback" not in bad.stderr
    not_json = await run_cli_async("publish", "threat_detected", "--data", "{", "--url", url,
                       env={"JWT_SECRET": SECRET})
    assert not_json.returncode == 2
    assert "--data is not valid JSON" in not_json.stderr
    unreachable = await run_cli_async("publish", "threat_detected", "--data", "{}", "--url",
                          f"http://127.0.0.1:{free_port()}", env={"JWT_SECRET": SECRET})
    assert unreachable.returncode == 2
    assert "cannot reach the hub" in unreachable.stderr


async def test_dev_mode_prints_working_tokens(tmp_path: Path) -> None:
    hub = start_hub_process({}, "--dev", tmp_path=tmp_path)
    try:
        output = hub.log()
        viewer = re.search(r"viewer token: (\S+)", output)
        secret = re.search(r"export JWT_SECRET=(\S+)", output)
        assert viewer and secret
        ws = await connected(f"ws://127.0.0.1:{hub.port}/ws/events", viewer.group(1))
        await ws.close()
        # A second run gets another secret: there is no default key.
        other = start_hub_process({}, "--dev", tmp_path=tmp_path)
        try:
            again = re.search(r"export JWT_SECRET=(\S+)", other.log())
            assert again is not None and again.group(1) != secret.group(1)
        finally:
            other.process.terminate()
            other.process.wait(20)
    finally:
        hub.process.terminate()
        hub.process.wait(20)


async def test_sigterm_announces_shutdown_flushes_and_closes_with_1001(tmp_path: Path) -> None:
    hub = start_hub_process({"JWT_SECRET": SECRET}, tmp_path=tmp_path)
    ws = await ws_connect(f"ws://127.0.0.1:{hub.port}/ws/events", make_token())
    assert (await recv_json(ws))["type"] == "connection_established"
    sio = SioClient()
    await sio.connect(hub.url, auth={"token": make_token()})
    hub.process.send_signal(signal.SIGTERM)
    status = await recv_type(ws, "system_status")
    assert status["data"]["status"] == "shutdown"
    from tests.helpers import close_code

    code, reason = await close_code(ws)
    assert code == 1001
    assert reason == "server shutting down"
    envelope = await sio.next_event("system_status")
    assert envelope["data"]["status"] == "shutdown"
    await asyncio.wait_for(sio.disconnected.wait(), 15)
    # uvicorn re-raises the signal once shut down, so supervisors see how the process ended.
    assert hub.process.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in hub.log()
    assert SECRET not in hub.log()


# -- the first run ----------------------------------------------------------------------
@pytest.mark.parametrize("port", ["99999", "0", "-1", "eighty"])
def test_bad_ports_stop_with_one_line(port: str) -> None:
    result = run_cli("serve", "--dev", "--port", port)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"hub: error: --port must be a number from 1 to 65535, got "
        f"{port if port.lstrip('-').isdigit() else repr(port)}")
    assert result.stdout == ""  # no banner, nothing started


def test_a_port_in_use_stops_with_one_line_before_anything_starts() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--dev", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"hub: error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "started" not in result.stdout + result.stderr
    assert "viewer token" not in result.stdout  # the banner would promise a hub that is not there


async def test_dev_banner_snippets_run_when_pasted(tmp_path: Path) -> None:
    hub = start_hub_process({}, "--dev", tmp_path=tmp_path)
    listener = None
    try:
        lines = hub.log().splitlines()
        python_line = next(line.strip() for line in lines if line.strip().startswith("python"))
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl"))
        curl = [lines[start]]
        while curl[-1].rstrip().endswith("\\"):
            curl.append(lines[start + len(curl)])
        # Pasted into a shell as printed (the indent included).
        listener = await asyncio.create_subprocess_shell(
            python_line, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_env(None), start_new_session=True)
        assert listener.stdout is not None
        hello = json.loads(await asyncio.wait_for(listener.stdout.readline(), 30))
        assert hello["type"] == "connection_established"
        posted = await asyncio.create_subprocess_shell(
            "\n".join(curl), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(posted.communicate(), 30)
        assert posted.returncode == 0, err
        published = json.loads(out)
        while True:
            message = json.loads(await asyncio.wait_for(listener.stdout.readline(), 30))
            if message["type"] == "threat_detected":
                break
        assert message["id"] == published["id"]
    finally:
        if listener is not None and listener.returncode is None:
            os.killpg(listener.pid, signal.SIGKILL)  # the shell and the python it started
            await listener.wait()
        hub.process.terminate()
        hub.process.wait(20)


async def test_a_refused_publish_says_where_its_token_came_from(memory_hub: object) -> None:
    url = memory_hub.url  # type: ignore[attr-defined]
    viewer = make_token(role="viewer")
    from_env = await run_cli_async("publish", "threat_detected", "--data", json.dumps(THREAT),
                                   "--url", url, env={"HUB_TOKEN": viewer})
    assert from_env.returncode == 1
    assert "publish refused (403)" in from_env.stderr
    assert "the token came from the HUB_TOKEN environment variable" in from_env.stderr
    assert viewer not in from_env.stderr
    from_flag = await run_cli_async("publish", "threat_detected", "--data", json.dumps(THREAT),
                                    "--url", url, "--token", "not-a-jwt",
                                    env={"HUB_TOKEN": viewer})
    assert from_flag.returncode == 1
    assert "publish refused (401)" in from_flag.stderr
    assert "the token came from --token" in from_flag.stderr
