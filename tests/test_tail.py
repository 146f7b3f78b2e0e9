"""``hub tail``: line formatting, and the real command against real hub servers."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import orjson
import pytest

from hub.cli import build_parser
from hub.events import Event
from hub.tail import format_line, level, summary
from tests.conftest import ROOT, RunningHub, make_settings, make_token, run_hub
from tests.helpers import COST, HEALTH, THREAT, wait_until


def event(type_: str, data: dict[str, object]) -> Event:
    return Event(id="1700000000000-3", type=type_, timestamp="2025-01-15T10:30:00.123Z",
                 data=dict(data))


@pytest.mark.parametrize(("type_", "data", "text", "lvl"), [
    ("threat_detected", THREAT, "prompt_injection blocked (92%)", "high"),
    ("provider_health_change", HEALTH, "openai: healthy → degraded", "degraded"),
    ("cost_threshold_alert", COST, "daily budget at 80% (80.5/100.0)", "warning"),
    ("system_status", {"status": "online", "instance_id": "i-1", "message": "started"},
     "i-1 started", "online"),
    ("custom_type", {"a": 1}, '{"a":1}', ""),
])
def test_summary_and_level(type_: str, data: dict[str, object], text: str, lvl: str) -> None:
    e = event(type_, data)
    assert summary(e) == text
    assert level(e) == lvl


def test_plain_line() -> None:
    line = format_line(event("threat_detected", {**THREAT, "tenant_id": "acme"}), colour=False)
    assert line.startswith("10:30:00.123  threat_detected        HIGH      prompt_injection")
    assert "[tenant acme]" in line
    assert line.endswith("1700000000000-3")
    assert "\033[" not in line


def test_coloured_line_marks_type_and_severity() -> None:
    line = format_line(event("threat_detected", {**THREAT, "severity": "critical"}), colour=True)
    assert "\033[35mthreat_detected" in line  # the type's colour
    assert "\033[1;41;97mCRITICAL" in line  # critical stands out


def test_arguments() -> None:
    args = build_parser().parse_args(
        ["tail", "--types", "threat_detected,system_status", "--types", "cost_threshold_alert",
         "--since", "1700000000000-0", "--json"])
    assert args.types == ["threat_detected", "system_status", "cost_threshold_alert"]
    assert args.since == "1700000000000-0"
    assert args.url == "http://127.0.0.1:8000"


def test_since_must_be_an_event_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["tail", "--since", "yesterday"])
    assert exit_info.value.code == 2
    assert "--since takes an event id" in capsys.readouterr().err


# -- the command ------------------------------------------------------------------------
class Tail:
    """``python -m hub tail …`` as a child process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self, stream: str = "stdout") -> str:
        reader = self.process.stdout if stream == "stdout" else self.process.stderr
        assert reader is not None
        raw = await asyncio.wait_for(reader.readline(), 20)
        assert raw, f"hub tail closed its {stream}"
        return raw.decode().rstrip("\n")

    async def stderr_until(self, text: str) -> list[str]:
        lines = []
        while True:
            lines.append(await self.line("stderr"))
            if text in lines[-1]:
                return lines

    async def finish(self) -> tuple[int, str]:
        """Wait for it to exit by itself; return (exit code, rest of stderr)."""
        assert self.process.stderr is not None
        err = await asyncio.wait_for(self.process.stderr.read(), 20)
        return await asyncio.wait_for(self.process.wait(), 20), err.decode()


async def start_tail(*args: str, env: dict[str, str] | None = None) -> Tail:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", "tail", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "NO_COLOR": "", **(env or {})})
    return Tail(process)


@pytest.fixture
async def tail_procs() -> AsyncIterator[list[Tail]]:
    procs: list[Tail] = []
    yield procs
    for tail in procs:
        if tail.process.returncode is None:
            tail.process.terminate()
            await tail.process.wait()


async def subscribed(hub: RunningHub) -> None:
    def narrowed() -> bool:
        conns = list(hub.hub.websocket.connections)
        return len(conns) == 1 and conns[0].types is not None

    # The child process starts (imports, connects) first: seconds on a loaded machine.
    await wait_until(narrowed, timeout=30, what="hub tail's subscription")


async def test_json_lines_of_the_chosen_types(memory_hub: RunningHub,
                                              tail_procs: list[Tail]) -> None:
    tail = await start_tail("--url", memory_hub.url, "--types", "threat_detected", "--json",
                            env={"HUB_TOKEN": make_token()})
    tail_procs.append(tail)
    await subscribed(memory_hub)
    first = await memory_hub.publish("threat_detected", THREAT)
    await memory_hub.publish("provider_health_change", HEALTH)
    second = await memory_hub.publish("threat_detected", {**THREAT, "severity": "low"})
    lines = [orjson.loads(await tail.line()) for _ in range(2)]
    assert [m["id"] for m in lines] == [first.id, second.id]
    assert lines[1] == {"id": second.id, "type": "threat_detected",
                        "timestamp": second.timestamp, "data": second.data}


async def test_since_replays_then_continues(memory_hub: RunningHub,
                                            tail_procs: list[Tail]) -> None:
    old = await memory_hub.publish("threat_detected", THREAT)
    missed = await memory_hub.publish("cost_threshold_alert", COST)
    tail = await start_tail("--url", memory_hub.url, "--token", make_token(), "--since", old.id,
                            "--color", "never")
    tail_procs.append(tail)
    line = await tail.line()
    assert "cost_threshold_alert" in line and "WARNING" in line and line.endswith(missed.id)
    assert "caught up 1 event" in "\n".join(await tail.stderr_until("caught up"))
    live = await memory_hub.publish("provider_health_change", HEALTH)
    assert (await tail.line()).endswith(live.id)


async def test_refused_token_is_a_clear_error(memory_hub: RunningHub,
                                              tail_procs: list[Tail]) -> None:
    tail = await start_tail("--url", memory_hub.url, "--token", make_token(ttl=-60))
    tail_procs.append(tail)
    code, err = await tail.finish()
    assert code == 1
    assert "hub: error: the hub refused the token" in err
    assert "Traceback" not in err


async def test_missing_token(tail_procs: list[Tail]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HUB_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", "tail", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env)
    tail = Tail(process)
    tail_procs.append(tail)
    code, err = await tail.finish()
    assert code == 2
    assert "no token: pass --token or set HUB_TOKEN" in err


async def test_lost_connection_is_reported(tail_procs: list[Tail]) -> None:
    async with run_hub(make_settings()) as hub:
        tail = await start_tail("--url", hub.url, "--token", make_token(), "--retry-for", "1")
        tail_procs.append(tail)
        await tail.stderr_until("connected to")
    # The hub shut down (close 1001); nothing listens on its port any more.
    lines = await tail.stderr_until("connection lost")
    assert "1001" in lines[-1] and "reconnecting in" in lines[-1]
    code, err = await tail.finish()
    assert code == 1
    assert "could not reconnect within 1s" in err
    assert "Traceback" not in err
