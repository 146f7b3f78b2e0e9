"""The container image, built from docker/Dockerfile and run.

``scripts/image`` builds it with podman (no Docker daemon needed), offline, from a local
``python:3.11-slim`` base and a host-made wheelhouse; it installs podman/runc/debootstrap
with apt-get when they are missing (as root on Debian) and caches the base image and the
dependency wheels, so only the first run on a machine pays for them. The image is built
once per session, then run with host networking as shipped (its default command, port 8000)
against a private Redis, and checked the way an orchestrator and a client see it: the
``HEALTHCHECK``, the user it runs as, an event delivered to a WebSocket client, and the
drain on ``podman stop`` (``system_status: shutdown``, then close 1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, SECRET, RedisServer, make_token
from tests.helpers import THREAT, close_code, connected, recv_json, recv_type, send_json

# The first run on a machine installs podman and builds the base image (about 2 minutes).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PORT = 8000  # what the image's CMD serves and its HEALTHCHECK probes
TYPE = "threat_detected"


@pytest.fixture(scope="session")
def podman() -> list[str]:
    """Build the image (once per session); the podman command line to drive it."""
    result = subprocess.run([str(ROOT / "scripts" / "image")], cwd=ROOT, text=True,
                            capture_output=True, timeout=1200,
                            env={**_env(), "HUB_IMAGE_TAG": "hub:test"})
    assert result.returncode == 0, f"scripts/image failed:\n{result.stderr[-4000:]}"
    return result.stdout.strip().splitlines()[-1].split()


CACHE = Path(os.environ.get("HUB_IMAGE_CACHE", Path.home() / ".cache" / "hub-image"))


def _env() -> dict[str, str]:
    # scripts/image writes the containers.conf podman needs here (no default ulimits).
    return {"CONTAINERS_CONF": str(CACHE / "containers.conf"), **os.environ}


def run(podman: list[str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*podman, *args], text=True, capture_output=True, timeout=timeout,
                          env=_env())


@pytest.fixture
def container(podman: list[str]) -> Iterator[str]:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(("0.0.0.0", PORT))
        except OSError:
            pytest.fail(f"port {PORT} is in use: the image serves there with host networking")
    redis = RedisServer()
    redis.start()
    name = f"hub-test-{uuid.uuid4().hex[:8]}"
    started = run(podman, "run", "-d", "--name", name, "--network", "host",
                  "-e", f"REDIS_URL={redis.url}", "-e", f"JWT_SECRET={SECRET}",
                  "-e", f"HUB_STREAM_KEY=hub:image:{name}", "-e", f"HUB_INSTANCE_ID={name}",
                  "hub:test")
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        while True:  # the container is up once its health endpoint answers
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{PORT}/ws/health", timeout=1).status_code == 200:
                    break
            state = run(podman, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running" and time.monotonic() < deadline, \
                f"container {state}:\n{run(podman, 'logs', name).stdout[-3000:]}"
            time.sleep(0.1)
        yield name
    finally:
        run(podman, "rm", "-f", "-t", "0", name)
        redis.stop()


async def test_image_serves_and_drains(podman: list[str], container: str) -> None:
    # The image's HEALTHCHECK, run by the runtime inside the container.
    check = run(podman, "healthcheck", "run", container)
    assert check.returncode == 0, check.stdout + check.stderr
    state = run(podman, "inspect", "--format", "{{.State.Health.Status}}", container)
    assert state.stdout.strip() == "healthy", state.stdout + state.stderr
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"http://127.0.0.1:{PORT}/ws/health")).json()
    assert health["backend"] == "redis" and health["redis_connected"] is True

    # Not root: the configured user, and the server process itself.
    assert run(podman, "inspect", "--format", "{{.Config.User}}",
               container).stdout.strip() == "10001:10001"
    status = run(podman, "exec", container, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == ["10001"] * 4, status
    cmdline = run(podman, "exec", container, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "serve" in cmdline, cmdline

    # A plain WebSocket client receives an event published through the HTTP API.
    ws = await connected(f"ws://127.0.0.1:{PORT}/ws/events", make_token("alice"))
    await send_json(ws, {"action": "subscribe", "event_types": [TYPE, "system_status"]})
    await recv_type(ws, "subscription_updated")
    admin = {"Authorization": f"Bearer {make_token('ops', 'admin')}"}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"http://127.0.0.1:{PORT}/events", headers=admin,
                                   json={"type": TYPE, "data": THREAT})
    assert response.status_code == 202, response.text
    event = await recv_type(ws, TYPE)
    assert event["id"] == response.json()["id"]
    assert event["data"].items() >= THREAT.items()

    # podman stop sends the image's STOPSIGNAL (SIGTERM): the hub announces its shutdown,
    # then closes the client with 1001 (going away) so it resumes elsewhere.
    stop = await asyncio.create_subprocess_exec(*podman, "stop", "-t", "30", container,
                                                env=_env(), stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    announced = await recv_json(ws, 30, skip_status=False)
    assert announced["type"] == "system_status", announced
    assert announced["data"]["status"] == "shutdown"
    assert announced["data"]["instance_id"] == container
    assert (await close_code(ws, 30))[0] == 1001
    _, err = await asyncio.wait_for(stop.communicate(), 60)
    assert stop.returncode == 0, err
    # It exited on SIGTERM by itself, not killed after the grace period.
    exit_code = run(podman, "inspect", "--format", "{{.State.ExitCode}}", container)
    assert exit_code.stdout.strip() == "0", run(podman, "logs", container).stdout[-3000:]
