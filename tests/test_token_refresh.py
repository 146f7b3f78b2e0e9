"""In-band token refresh and the token_expiring notice (issue 15, item 1), on both
transports: a connection outlives several short token lifetimes by refreshing, and a
refresh that fails (another subject, a bad or expired token) leaves the old expiry in force."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hub.config import Settings
from hub.protocol import Action, parse_client_message
from tests.conftest import RunningHub, make_settings, make_token, run_hub
from tests.helpers import THREAT, close_code, connected, recv_type, send_json
from tests.sio_helpers import SioClient
from tests.sse_helpers import sse_connect

# Seconds: each token lives this long (make_token truncates the time: 4 to 5 s from now).
# Short lifetimes, yet longer than a scheduler stall on a loaded machine: everything a
# test does with one token (connect, refresh, get the reply) must fit inside it.
TTL = 5
LIFETIMES = 3
LEAD = 4.0  # the notice comes this long before exp: the window a refresh has to get in


def _settings() -> Settings:
    # The notice comes LEAD seconds before exp: a client refreshing on it keeps its
    # connection (a window of one second is less than a stall on a loaded machine).
    return make_settings(token_expiring_lead_s=LEAD)


def test_refresh_message_parses_and_needs_a_token() -> None:
    assert parse_client_message('{"action": "refresh", "token": "abc"}').token == "abc"
    assert parse_client_message('{"action": "refresh", "token": "abc"}').action is Action.REFRESH
    for bad in ('{"action": "refresh"}', '{"action": "refresh", "token": ""}',
                '{"action": "refresh", "token": 5}'):
        with pytest.raises(Exception, match="refresh needs a token") as info:
            parse_client_message(bad)
        assert getattr(info.value, "code", None) == "missing_token"


async def test_websocket_stays_connected_across_three_lifetimes_by_refreshing() -> None:
    async with run_hub(_settings()) as running:
        first = make_token(ttl=TTL)
        ws = await connected(running.ws_url, first)
        until = time.time() + LIFETIMES * TTL + 1
        refreshes = 0
        exp = 0.0
        while time.time() < until:
            notice = await recv_type(ws, "token_expiring", timeout=TTL + 5)
            assert notice["data"]["exp"] >= exp  # the notice is for the current token
            await send_json(ws, {"action": "refresh", "token": make_token(ttl=TTL)})
            reply = await recv_type(ws, "token_refreshed")
            assert reply["data"]["user_id"] == "alice"
            assert reply["data"]["exp"] >= notice["data"]["exp"]
            exp = reply["data"]["exp"]
            refreshes += 1
        assert refreshes >= LIFETIMES
        # Still open and delivering, long past the first token's exp.
        event = await running.publish("threat_detected", THREAT)
        assert (await recv_type(ws, "threat_detected"))["id"] == event.id
        # Stop refreshing: the last token's expiry closes it.
        assert await close_code(ws, timeout=TTL + 10) == (4003, "token expired")


@pytest.mark.parametrize("bad_token, code", [
    (lambda: make_token("mallory", ttl=3600), "subject_mismatch"),
    (lambda: make_token(ttl=3600, tenant_id="globex"), "subject_mismatch"),
    (lambda: make_token(ttl=3600, secret="another-secret-that-is-long-enough-32b"),
     "bad_signature"),
    (lambda: make_token(ttl=-60), "token_expired"),
    (lambda: "not-a-jwt", "malformed_token"),
])
async def test_websocket_failed_refresh_is_an_error_and_the_old_expiry_stands(
        bad_token: Any, code: str) -> None:
    async with run_hub(_settings()) as running:
        ws = await connected(running.ws_url, make_token(ttl=TTL))
        await send_json(ws, {"action": "refresh", "token": bad_token()})
        error = await recv_type(ws, "error")
        assert error["data"]["code"] == code
        assert await close_code(ws, timeout=TTL + 10) == (4003, "token expired")


async def test_refresh_with_the_same_token_gets_no_second_notice() -> None:
    # A client that re-reads a file nobody has renewed yet sends the same token: it is told
    # once, not flooded with notices (and its refreshes with them) until the expiry.
    import orjson
    import websockets

    async with run_hub(_settings()) as running:
        token = make_token(ttl=TTL)
        ws = await connected(running.ws_url, token)
        await recv_type(ws, "token_expiring", timeout=TTL + 5)
        await send_json(ws, {"action": "refresh", "token": token})
        seen = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                seen.append(orjson.loads(await asyncio.wait_for(ws.recv(), TTL + 10))["type"])
        assert seen.count("token_refreshed") == 1
        assert "token_expiring" not in seen
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003


async def test_websocket_refresh_extends_a_token_without_exp_notice() -> None:
    # No lead: no notice, but a refresh still moves the expiry.
    async with run_hub(make_settings(token_expiring_lead_s=0)) as running:
        ws = await connected(running.ws_url, make_token(ttl=TTL))
        await send_json(ws, {"action": "refresh", "token": make_token(ttl=3600)})
        reply = await recv_type(ws, "token_refreshed")
        assert reply["data"]["exp"] > time.time() + 3000
        # Time passes beyond the first token's exp (nothing to await: it is the clock):
        await asyncio.sleep(TTL + 1)
        await send_json(ws, {"action": "ping"})
        assert (await recv_type(ws, "pong"))["type"] == "pong"
        await ws.close()


class _RefreshingSio(SioClient):
    def __init__(self) -> None:
        super().__init__()
        self.expiring: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_expiring(data: dict[str, Any]) -> None:
            await self.expiring.put(data)
        self.client.on("token_expiring", on_expiring)


async def test_socketio_stays_connected_across_three_lifetimes_by_refreshing() -> None:
    async with run_hub(_settings()) as running:
        client = _RefreshingSio()
        await client.connect(running.url, auth={"token": make_token(ttl=TTL)})
        until = time.time() + LIFETIMES * TTL + 1
        refreshes = 0
        while time.time() < until:
            notice = await asyncio.wait_for(client.expiring.get(), TTL + 5)
            assert "exp" in notice
            ack = await client.client.call("refresh", {"token": make_token(ttl=TTL)},
                                           timeout=10)
            assert ack["user_id"] == "alice" and ack["exp"] >= notice["exp"]
            refreshes += 1
        assert refreshes >= LIFETIMES
        assert not client.disconnected.is_set()
        event = await running.publish("threat_detected", THREAT)
        assert (await client.next_event())["id"] == event.id
        await asyncio.wait_for(client.disconnected.wait(), TTL + 10)
        assert (await client.next_other("token_expired"))["code"] == 4003


async def test_socketio_refresh_with_another_subject_is_refused() -> None:
    async with run_hub(_settings()) as running:
        client = _RefreshingSio()
        await client.connect(running.url, auth={"token": make_token(ttl=TTL)})
        ack = await client.client.call("refresh", {"token": make_token("mallory")}, timeout=10)
        assert ack["error"]["code"] == "subject_mismatch"
        ack = await client.client.call("refresh", {}, timeout=10)
        assert ack["error"]["code"] == "missing_token"
        await asyncio.wait_for(client.disconnected.wait(), TTL + 10)
        assert (await client.next_other("token_expired"))["code"] == 4003


# -- hub.client and hub tail with a token source -----------------------------------------
async def test_client_with_a_token_source_refreshes_by_itself() -> None:
    from hub.client import Notice, NoticeKind, subscribe

    async with run_hub(_settings()) as running:
        issued: list[str] = []

        def source() -> str:
            issued.append(make_token(ttl=TTL))
            return issued[-1]

        notices: list[Notice] = []
        refreshed = asyncio.Event()

        def on_notice(notice: Notice) -> None:
            notices.append(notice)
            if sum(n.kind is NoticeKind.TOKEN_REFRESHED for n in notices) >= LIFETIMES + 1:
                refreshed.set()

        async with subscribe(running.url, source, on_notice=on_notice) as events:
            iterator = aiter(events)
            first = asyncio.ensure_future(anext(iterator))
            started = time.time()
            await asyncio.wait_for(refreshed.wait(), (LIFETIMES + 2) * TTL + 10)
            # Past three lifetimes of the first token (the clock: nothing to await).
            await asyncio.sleep(max(0.0, started + LIFETIMES * TTL - time.time()))
            event = await running.publish("threat_detected", THREAT)
            assert (await asyncio.wait_for(first, 10)).id == event.id
        kinds = [n.kind for n in notices]
        assert NoticeKind.DISCONNECTED not in kinds  # one connection all along
        assert kinds.count(NoticeKind.CONNECTED) == 1
        assert len(issued) >= LIFETIMES + 2  # the connect, then one per refresh


async def test_client_reports_a_refused_refresh_as_a_notice() -> None:
    """A source that hands out another user's token: the hub answers the refresh with an
    ``error`` (``subject_mismatch``, with its own ``code`` and ``message`` fields), which
    the client reports as a notice and keeps streaming."""
    from hub.client import Notice, NoticeKind, subscribe

    async with run_hub(_settings()) as running:
        tokens = iter([make_token("alice", ttl=TTL)])

        def source() -> str:
            return next(tokens, None) or make_token("mallory", ttl=3600)

        refused = asyncio.Event()
        notices: list[Notice] = []

        def on_notice(notice: Notice) -> None:
            notices.append(notice)
            if notice.kind is NoticeKind.ERROR and notice.data.get("code") == "subject_mismatch":
                refused.set()

        async with subscribe(running.url, source, on_notice=on_notice) as events:
            iterator = aiter(events)
            first = asyncio.ensure_future(anext(iterator))
            await asyncio.wait_for(refused.wait(), TTL + 10)
            event = await running.publish("threat_detected", THREAT)
            assert (await asyncio.wait_for(first, 10)).id == event.id


async def test_client_token_file_is_re_read(tmp_path: Any) -> None:
    from hub.client import current_token, token_file

    path = tmp_path / "token"
    path.write_text("one\n")
    source = token_file(path)
    assert await current_token(source) == "one"
    path.write_text("two")
    assert await current_token(source) == "two"


async def test_hub_tail_token_file_refreshes_in_band(tmp_path: Any) -> None:
    import os
    import sys

    from tests.conftest import ROOT

    path = tmp_path / "token"

    def write() -> None:  # a sidecar keeping the file fresh, replaced atomically
        tmp = tmp_path / "token.new"
        tmp.write_text(make_token(ttl=TTL))
        tmp.replace(path)

    write()

    async def sidecar() -> None:
        while True:
            await asyncio.sleep(0.2)
            write()

    async with run_hub(_settings()) as running:
        keeper = asyncio.create_task(sidecar())
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub", "tail", "--url", running.url, "--token-file",
            str(path), "--json", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "NO_COLOR": ""})
        try:
            assert process.stderr is not None and process.stdout is not None
            refreshes = 0
            lines: list[str] = []
            while refreshes < LIFETIMES + 1:
                line = (await asyncio.wait_for(process.stderr.readline(), TTL + 10)).decode()
                assert line, "hub tail exited: " + "".join(lines)
                lines.append(line)
                assert "connection lost" not in line
                refreshes += "token refreshed" in line
            event = await running.publish("threat_detected", THREAT)
            out = await asyncio.wait_for(process.stdout.readline(), 10)
            assert event.id in out.decode()
            assert sum("connected to" in line for line in lines) == 1
        finally:
            keeper.cancel()
            process.terminate()
            await process.wait()


def test_hub_tail_token_file_errors(tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    missing = subprocess.run([sys.executable, "-m", "hub", "tail", "--token-file",
                              str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT,
                             timeout=30)
    assert missing.returncode == 2 and "--token-file" in missing.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = subprocess.run([sys.executable, "-m", "hub", "tail", "--token-file", str(empty)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2 and "empty" in result.stderr


async def test_client_with_a_stale_source_reconnects_after_expiry_and_resumes() -> None:
    # The source's token is not renewed before exp (a late sidecar): the refresh does not
    # help, the connection expires, and the client reconnects with the source's newer token
    # and resumes, instead of giving up as it does with a fixed token.
    from hub.client import Notice, NoticeKind, subscribe

    async with run_hub(_settings()) as running:
        current = [make_token(ttl=TTL)]
        notices: list[Notice] = []
        reconnected = asyncio.Event()

        def on_notice(notice: Notice) -> None:
            notices.append(notice)
            if notice.kind is NoticeKind.DISCONNECTED:
                current[0] = make_token(ttl=3600)  # renewed, late
            if sum(n.kind is NoticeKind.CONNECTED for n in notices) == 2:
                reconnected.set()

        async with subscribe(running.url, lambda: current[0], on_notice=on_notice,
                             backoff_base=0.1) as events:
            iterator = aiter(events)
            first = asyncio.ensure_future(anext(iterator))
            await asyncio.wait_for(reconnected.wait(), TTL + 20)
            event = await running.publish("threat_detected", THREAT)
            assert (await asyncio.wait_for(first, 10)).id == event.id
        disconnects = [n for n in notices if n.kind is NoticeKind.DISCONNECTED]
        assert disconnects[0].data["code"] == 4003


# -- SSE: refresh by reconnecting with Last-Event-ID ----------------------------------------
async def test_sse_refreshes_by_reconnecting_with_last_event_id(any_hub: RunningHub) -> None:
    """The documented SSE path: the stream ends at exp with ``token_expired``; the client
    reconnects with a new token and Last-Event-ID and gets every event published while it
    was away, once, then live ones."""
    seen: list[str] = []
    async with sse_connect(any_hub.url, make_token(ttl=TTL)) as stream:
        assert (await stream.next_event()).event == "connection_established"
        for n in range(2):
            published = await any_hub.publish("threat_detected", {**THREAT, "n": n})
            event = await stream.next_event()
            assert event.id == published.id and event.id is not None
            seen.append(event.id)
        expired = await stream.next_event(timeout=TTL + 10)
        assert expired.event == "token_expired", expired
        assert expired.json["data"]["message"] == "token expired"
        assert await stream.next(timeout=10) is None  # the response ends
    # While the client is away (its token renewed by whoever issues them).
    missed = [await any_hub.publish("threat_detected", {**THREAT, "n": 10 + n})
              for n in range(3)]
    headers = {"last-event-id": seen[-1]}  # what EventSource sends on its reconnect
    async with sse_connect(any_hub.url, make_token(ttl=3600), headers=headers) as stream:
        assert (await stream.next_event()).event == "connection_established"
        replayed = await stream.events_until("resumed")
        assert [e.id for e in replayed] == [e.id for e in missed]  # all, in order, once
        live = await any_hub.publish("threat_detected", THREAT)
        assert (await stream.next_event()).id == live.id
        ids = seen + [e.id for e in replayed] + [live.id]
    assert len(ids) == len(set(ids))  # nothing twice across the two streams
