"""Durable consumers (issue 14, item 4): a cursor the hub keeps per user and name, moved by
acks; after a disconnect, a crash of the pipeline or a restart of a hub instance the
consumer gets every event after its last ack (at least once), then live ones."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import socketio
import websockets
from redis import asyncio as aioredis

from hub.consumers import CursorStore, MemoryCursors, Owner, RedisCursors, check_name
from hub.errors import ErrorCode, ProtocolError
from hub.protocol import Action, parse_client_message
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
from tests.helpers import THREAT, connected, recv_json, recv_type, send_json, wait_until
from tests.sio_helpers import SioClient

ALICE = make_token("alice")
ADMIN = make_token("root", "admin")
TYPES = ["threat_detected"]


def threat(n: int, severity: str = "high") -> dict[str, Any]:
    return {**THREAT, "severity": severity, "n": n}


# -- the protocol, without a socket ------------------------------------------------------
def test_ack_and_consumer_parse() -> None:
    ack = parse_client_message('{"action": "ack", "id": "1700000000000-3"}')
    assert ack.action is Action.ACK and ack.event_id == "1700000000000-3"
    sub = parse_client_message(orjson.dumps({
        "action": "subscribe", "event_types": TYPES, "consumer": "etl-1.a:b_c"}).decode())
    assert sub.consumer == "etl-1.a:b_c"
    assert parse_client_message('{"action": "subscribe", "event_types": []}').consumer is None


@pytest.mark.parametrize("message,code", [
    ({"action": "ack"}, ErrorCode.INVALID_ACK),
    ({"action": "ack", "id": "latest"}, ErrorCode.INVALID_ACK),
    ({"action": "ack", "id": 17}, ErrorCode.INVALID_ACK),
    ({"action": "subscribe", "event_types": [], "consumer": ""}, ErrorCode.INVALID_CONSUMER),
    ({"action": "subscribe", "event_types": [], "consumer": "x" * 65},
     ErrorCode.INVALID_CONSUMER),
    ({"action": "subscribe", "event_types": [], "consumer": "a b"},
     ErrorCode.INVALID_CONSUMER),
    ({"action": "subscribe", "event_types": [], "consumer": "-lead"},
     ErrorCode.INVALID_CONSUMER),
    ({"action": "subscribe", "event_types": [], "consumer": ["etl"]},
     ErrorCode.INVALID_CONSUMER),
])
def test_bad_ack_or_consumer_is_a_distinct_error(message: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(orjson.dumps(message).decode())
    assert caught.value.code == code


def test_names_up_to_64_characters() -> None:
    assert check_name("a" * 64) == "a" * 64


# -- the stores ----------------------------------------------------------------------------
@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer
                ) -> AsyncIterator[CursorStore]:
    if request.param == "memory":
        yield MemoryCursors()
        return
    client = aioredis.Redis.from_url(redis_server.url)
    yield RedisCursors(client, f"hub:test:{uuid.uuid4().hex[:8]}:consumers")
    await client.aclose()


async def test_store_bounds_scopes_and_monotonic_acks(store: CursorStore) -> None:
    alice, bob = Owner("alice", None), Owner("alice", "tenant-b")
    first = await store.register(alice, "etl", "5-0", max_total=3, max_per_owner=2)
    assert first.acked == "5-0"
    # Existing: found as it is (its start stays), whatever start is asked for.
    assert (await store.register(alice, "etl", "9-0", max_total=3, max_per_owner=2)).acked == "5-0"
    # Same user name in another tenant: another owner, another consumer.
    assert (await store.register(bob, "etl", "1-0", max_total=3, max_per_owner=2)).acked == "1-0"
    await store.register(alice, "second", "0-0", max_total=3, max_per_owner=2)
    with pytest.raises(ProtocolError) as caught:
        await store.register(alice, "third", "0-0", max_total=9, max_per_owner=2)
    assert caught.value.code == ErrorCode.TOO_MANY_CONSUMERS
    with pytest.raises(ProtocolError) as caught:
        await store.register(Owner("carol", None), "x", "0-0", max_total=3, max_per_owner=2)
    assert caught.value.code == ErrorCode.TOO_MANY_CONSUMERS
    await store.ack(alice, "etl", "7-2")
    await store.ack(alice, "etl", "6-9")  # older: ignored
    await store.ack(alice, "etl", "7-2")
    await store.ack(alice, "etl", "7-10")  # (ms, seq) compare as numbers, not text
    await store.ack(alice, "etl", "7-9")
    await store.ack(bob, "gone", "3-0")  # vanished (Redis lost its data): re-created there
    records = {(r.tenant, r.name): r for r in await store.listing()}
    assert records[(None, "etl")].acked == "7-10"
    assert records[(None, "etl")].acked_at is not None
    assert records[("tenant-b", "etl")].acked == "1-0"
    assert records[("tenant-b", "gone")].acked == "3-0"
    assert records[(None, "etl")].user_id == "alice"
    # Deleting one frees its place under the bounds.
    assert await store.delete(alice, "second") is True
    assert await store.delete(alice, "second") is False
    third = await store.register(alice, "third", "8-0", max_total=9, max_per_owner=2)
    assert third.acked == "8-0"


# -- one instance, memory backend --------------------------------------------------------
async def consumer_ws(hub: RunningHub, name: str, token: str = ALICE,
                      **extra: Any) -> tuple[websockets.ClientConnection, dict[str, Any]]:
    ws = await connected(hub.ws_url, token)
    await send_json(ws, {"action": "subscribe", "event_types": TYPES, "consumer": name,
                         **extra})
    reply = await recv_type(ws, "subscription_updated")
    return ws, reply["data"]


async def next_event(ws: websockets.ClientConnection) -> dict[str, Any]:
    while True:
        message = await recv_json(ws)
        if "id" in message:
            return message


async def cursor(hub: RunningHub, name: str, user: str = "alice") -> str | None:
    for row in await hub.hub.consumers.listing():
        if row["name"] == name and row["user_id"] == user:
            return str(row["acked_id"])
    return None


def stored(hub: RunningHub, name: str, user: str = "alice") -> str | None:
    """The cursor in a memory hub's store (no await: for wait_until)."""
    record = hub.hub.consumers.store._records.get(Owner(user, None).field(name))
    return None if record is None else str(record.acked)


async def test_reconnect_gets_every_event_after_the_last_ack(memory_hub: RunningHub) -> None:
    ws, data = await consumer_ws(memory_hub, "etl")
    assert data["consumer"]["name"] == "etl"
    await recv_type(ws, "resumed")
    ids = [(await memory_hub.publish("threat_detected", threat(n))).id for n in range(6)]
    got = [(await next_event(ws))["id"] for _ in range(6)]
    assert got == ids
    await send_json(ws, {"action": "ack", "id": ids[2]})
    await send_json(ws, {"action": "ack", "id": ids[1]})  # older: ignored
    await send_json(ws, {"action": "ping"})
    await recv_type(ws, "pong")  # both acks handled
    await wait_until(lambda: stored(memory_hub, "etl") == ids[2])
    await ws.close()
    later = [(await memory_hub.publish("threat_detected", threat(n))).id for n in range(6, 9)]
    assert await cursor(memory_hub, "etl") == ids[2]

    ws, data = await consumer_ws(memory_hub, "etl")
    assert data["consumer"] == {"name": "etl", "acked_id": ids[2]}
    replayed = [(await next_event(ws))["id"] for _ in range(6)]
    assert replayed == ids[3:] + later  # the un-acked tail again, then what was missed
    resumed = await recv_type(ws, "resumed")
    assert resumed["data"]["last_event_id"] == ids[2]
    live = (await memory_hub.publish("threat_detected", threat(9))).id
    assert (await next_event(ws))["id"] == live
    await ws.close()


async def test_ack_errors(memory_hub: RunningHub) -> None:
    plain = await connected(memory_hub.ws_url, ALICE)
    await send_json(plain, {"action": "ack", "id": "1-0"})
    assert (await recv_type(plain, "error"))["data"]["code"] == ErrorCode.NOT_A_CONSUMER
    await plain.close()

    ws, _ = await consumer_ws(memory_hub, "etl")
    await recv_type(ws, "resumed")
    sent = (await memory_hub.publish("threat_detected", threat(1))).id
    assert (await next_event(ws))["id"] == sent
    ms, _seq = sent.split("-")
    ahead = f"{int(ms) + 1000}-0"
    await send_json(ws, {"action": "ack", "id": ahead})
    error = await recv_type(ws, "error")
    assert error["data"]["code"] == ErrorCode.UNKNOWN_ACK_ID
    await send_json(ws, {"action": "ack", "id": "nope"})
    assert (await recv_type(ws, "error"))["data"]["code"] == ErrorCode.INVALID_ACK
    await send_json(ws, {"action": "subscribe", "event_types": TYPES, "consumer": "other"})
    assert (await recv_type(ws, "error"))["data"]["code"] == ErrorCode.CONSUMER_CONFLICT
    # The connection is fine, and the bad ack moved nothing.
    await send_json(ws, {"action": "ack", "id": sent})
    await wait_until(lambda: stored(memory_hub, "etl") == sent)
    await ws.close()


async def test_cursors_are_per_user(memory_hub: RunningHub) -> None:
    ws, _ = await consumer_ws(memory_hub, "etl")
    await recv_type(ws, "resumed")
    first = (await memory_hub.publish("threat_detected", threat(1))).id
    await next_event(ws)
    await send_json(ws, {"action": "ack", "id": first})
    await wait_until(lambda: stored(memory_hub, "etl") == first)
    second = (await memory_hub.publish("threat_detected", threat(2))).id
    # Bob's "etl" is his own: it starts from now, not at alice's cursor...
    bob, data = await consumer_ws(memory_hub, "etl", make_token("bob"))
    assert data["consumer"]["acked_id"] == second
    await recv_type(bob, "resumed")
    third = (await memory_hub.publish("threat_detected", threat(3))).id
    assert (await next_event(bob))["id"] == third
    await send_json(bob, {"action": "ack", "id": third})
    await wait_until(lambda: stored(memory_hub, "etl", "bob") == third)
    # ... and his acks move only his.
    assert stored(memory_hub, "etl") == first
    assert await cursor(memory_hub, "etl", "bob") == third
    await ws.close()
    await bob.close()


async def test_too_many_consumers_is_refused() -> None:
    async with run_hub(make_settings(consumer_max_per_user=1)) as hub:
        ws, _ = await consumer_ws(hub, "one")
        other = await connected(hub.ws_url, ALICE)
        await send_json(other, {"action": "subscribe", "event_types": TYPES,
                                "consumer": "two"})
        error = await recv_type(other, "error")
        assert error["data"]["code"] == ErrorCode.TOO_MANY_CONSUMERS
        await ws.close()
        await other.close()


async def test_behind_more_than_max_lag_is_told_what_it_lost() -> None:
    settings = make_settings(history_size=5, consumer_max_lag=8, replay_window=0)
    async with run_hub(settings) as hub:
        ws, _ = await consumer_ws(hub, "slow")
        await recv_type(ws, "resumed")
        first = (await hub.publish("threat_detected", threat(0))).id
        await next_event(ws)
        await send_json(ws, {"action": "ack", "id": first})
        await wait_until(lambda: stored(hub, "slow") == first)
        await ws.close()
        # Retention is max(HUB_HISTORY_SIZE, HUB_CONSUMER_MAX_LAG): 8 behind loses nothing.
        within = [(await hub.publish("threat_detected", threat(n))).id for n in range(1, 9)]
        ws, data = await consumer_ws(hub, "slow")
        assert data["consumer"]["acked_id"] == first
        assert [(await next_event(ws))["id"] for _ in range(8)] == within
        assert (await recv_type(ws, "resumed"))["data"]["truncated"] is False
        await ws.close()
        # 12 behind: the first 4 are gone, and the consumer is told which.
        beyond = [(await hub.publish("threat_detected", threat(n))).id for n in range(9, 13)]
        ws, _ = await consumer_ws(hub, "slow")
        notice = await recv_type(ws, "history_truncated")
        assert notice["data"]["consumer"] == "slow"
        assert notice["data"]["last_event_id"] == first
        assert notice["data"]["first_retained_id"] == within[4]
        assert [(await next_event(ws))["id"] for _ in range(8)] == within[4:] + beyond
        await ws.close()


async def test_admin_listing_and_metrics(memory_hub: RunningHub) -> None:
    ws, _ = await consumer_ws(memory_hub, "etl")
    await recv_type(ws, "resumed")
    ids = [(await memory_hub.publish("threat_detected", threat(n))).id for n in range(4)]
    for _ in ids:
        await next_event(ws)
    await send_json(ws, {"action": "ack", "id": ids[0]})
    await wait_until(lambda: stored(memory_hub, "etl") == ids[0])
    async with httpx.AsyncClient(base_url=memory_hub.url) as client:
        denied = await client.get("/consumers", headers={"Authorization": f"Bearer {ALICE}"})
        assert denied.status_code == 403
        assert (await client.get("/consumers")).status_code == 401
        listed = await client.get("/consumers", headers={"Authorization": f"Bearer {ADMIN}"})
        metrics = (await client.get("/metrics")).text
    assert listed.status_code == 200
    (row,) = listed.json()["consumers"]
    assert row["user_id"] == "alice" and row["name"] == "etl" and row["acked_id"] == ids[0]
    assert row["lag_events"] == 3 and row["lag_exact"] is True
    assert row["connections_here"] == 1
    assert 'hub_consumer_lag_events{consumer="etl"} 3.0' in metrics
    assert "hub_consumer_lag_events_max 3.0" in metrics
    assert "hub_consumers 1.0" in metrics
    await ws.close()

    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=memory_hub.url, headers=admin) as client:
        bad = await client.request("DELETE", "/consumers", json={"user_id": "alice",
                                                                 "name": "a b"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_consumer"
        gone = await client.request("DELETE", "/consumers", json={"user_id": "alice",
                                                                  "name": "etl"})
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        again = await client.request("DELETE", "/consumers", json={"user_id": "alice",
                                                                   "name": "etl"})
        assert again.status_code == 404
        assert again.json()["error"]["code"] == ErrorCode.UNKNOWN_CONSUMER
        assert (await client.get("/consumers")).json()["consumers"] == []


async def test_socketio_consumer_acks_and_resumes(memory_hub: RunningHub) -> None:
    sio = SioClient()
    await sio.connect(memory_hub.url, auth={"token": ALICE, "consumer": "dash-etl",
                                            "event_types": TYPES})
    await sio.next_other("resumed")
    ids = [(await memory_hub.publish("threat_detected", threat(n))).id for n in range(4)]
    assert [(await sio.next_event())["id"] for _ in ids] == ids
    reply = await sio.call("ack", {"id": ids[1]})
    assert reply == {"consumer": {"name": "dash-etl", "acked_id": ids[1]}}
    bad = await sio.call("ack", "not-an-id")
    assert bad["error"]["code"] == ErrorCode.INVALID_ACK
    await wait_until(lambda: stored(memory_hub, "dash-etl") == ids[1])
    await sio.close()
    later = (await memory_hub.publish("threat_detected", threat(4))).id

    again = SioClient()
    await again.connect(memory_hub.url, auth={"token": ALICE, "event_types": TYPES})
    ack = await again.call("subscribe", {"event_types": TYPES, "consumer": "dash-etl"})
    assert ack["consumer"] == {"name": "dash-etl", "acked_id": ids[1]}
    assert ack["replayed"] == 3
    assert [(await again.next_event())["id"] for _ in range(3)] == [*ids[2:], later]
    await again.close()


async def test_socketio_bad_consumer_is_refused_at_connect(memory_hub: RunningHub) -> None:
    sio = SioClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(memory_hub.url, auth={"token": ALICE, "consumer": "a b"})
    refusal = await asyncio.wait_for(sio.connect_error, 10)
    assert refusal["data"]["code"] == ErrorCode.INVALID_CONSUMER


async def test_client_acks_only_what_the_caller_handled(memory_hub: RunningHub) -> None:
    from hub.client import subscribe

    async def pipeline(count: int, fail: bool = False) -> list[str]:
        handled: list[str] = []
        async with subscribe(memory_hub.url, ALICE, types=TYPES, consumer="etl",
                             filter={"min_severity": "high"}) as events:
            async for event in events:
                if fail:
                    raise RuntimeError(f"the pipeline's code failed on {event.id}")
                handled.append(event.id)
                if len(handled) == count:
                    break
        return handled

    first = asyncio.create_task(pipeline(3))
    await wait_until(lambda: stored(memory_hub, "etl") is not None)
    ids = []
    for n in range(6):
        event = await memory_hub.publish("threat_detected",
                                         threat(n, "high" if n % 2 == 0 else "low"))
        if n % 2 == 0:
            ids.append(event.id)
    assert await asyncio.wait_for(first, 10) == ids  # filtered on the server
    # The last one was handled, but the loop left before asking for the next: not acked.
    await wait_until(lambda: stored(memory_hub, "etl") == ids[1])
    ids.append((await memory_hub.publish("threat_detected", threat(7, "critical"))).id)

    # A run whose code fails acknowledges nothing of what it failed on...
    with pytest.raises(RuntimeError, match=ids[2]):
        await asyncio.wait_for(pipeline(1, fail=True), 10)
    # ... so the next run gets it again (at least once), then what followed.
    assert await asyncio.wait_for(pipeline(2), 10) == ids[2:]


# -- the proof: two `hub serve` instances on Redis, a pipeline killed mid-stream ---------
def _tail_ids(path: Path) -> list[str]:
    """The ids a `hub tail --json` printed (a line cut short by the kill is not one)."""
    ids = []
    for line in path.read_text().splitlines():
        try:
            ids.append(str(orjson.loads(line)["id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def _key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


async def test_pipeline_killed_and_instance_restarted_gets_every_event_after_its_ack(
        redis_server: RedisServer, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    stream = f"hub:test:{unique}"
    env = {"JWT_SECRET": SECRET, "REDIS_URL": redis_server.url, "HUB_STREAM_KEY": stream,
           "HUB_SOCKETIO_CHANNEL": f"socketio-{unique}",
           "HUB_LEGACY_CHANNEL": f"koreshield:events:{unique}",
           "HUB_JOURNAL_DIR": str(tmp_path / "journal"), "HUB_SHUTDOWN_TIMEOUT_S": "2"}
    a, b = await asyncio.gather(
        asyncio.to_thread(start_hub_process, {**env, "HUB_INSTANCE_ID": f"a-{unique}"},
                          tmp_path=tmp_path),
        asyncio.to_thread(start_hub_process, {**env, "HUB_INSTANCE_ID": f"b-{unique}"},
                          tmp_path=tmp_path))
    redis = redis_server.client()
    field = Owner("alice", None).field("etl")

    def pipeline(run: int) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp_path / f"pipeline-{run}.out"
        process = subprocess.Popen(
            [sys.executable, "-m", "hub", "tail", "--url", b.url, "--consumer", "etl",
             "--min-severity", "high", "--types", "threat_detected", "--json"],
            env={**os.environ, "HUB_TOKEN": ALICE}, stdout=out.open("wb"),
            stderr=(tmp_path / f"pipeline-{run}.err").open("wb"))
        return process, out

    high: list[str] = []  # what the consumer must get: high threats, in publish order

    def stored_index() -> int:
        """Where the cursor in Redis is in ``high`` (-1: before the first of them)."""
        acked = orjson.loads(redis.hget(f"{stream}:consumers", field) or b"{}").get("acked")
        return high.index(acked) if acked in high else -1

    killed = asyncio.Event()

    async def publish(total: int) -> None:
        async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
            for n in range(total):
                if n == total // 2:
                    # However slow the machine, the kill comes mid-stream: the rest is
                    # published after it, during the instance's restart and after.
                    await killed.wait()
                severity = "high" if n % 2 == 0 else "low"
                response = await client.post(
                    "/events", json={"type": "threat_detected", "data": threat(n, severity)},
                    headers={"Authorization": f"Bearer {ADMIN}"})
                assert response.status_code == 202, response.text
                if severity == "high":
                    high.append(response.json()["id"])
                await asyncio.sleep(0.005)  # a steady stream (pacing, not synchronisation)

    first, out1 = pipeline(1)
    second = None
    try:
        await wait_until(lambda: redis.hexists(f"{stream}:consumers", field), 20,
                         "the consumer's cursor in Redis")
        publisher = asyncio.create_task(publish(300))
        await wait_until(lambda: len(_tail_ids(out1)) >= 40, 30, "the first run's events")
        # Its acks trail what it printed (at most one per 0.1 s, then the instance's write):
        # kill it once they have reached Redis past the 20th, however late they come.
        await wait_until(lambda: stored_index() >= 20, 30, "the first run's acks in Redis")
        os.kill(first.pid, signal.SIGKILL)  # mid-stream: no goodbye, no last ack
        first.wait()
        at_kill = len(high)
        killed.set()
        # An instance restarts meanwhile: the one the pipeline was on.
        await asyncio.to_thread(stop_process, b.process)
        b = await asyncio.to_thread(start_hub_process, {**env, "HUB_INSTANCE_ID": f"b-{unique}"},
                                    tmp_path=tmp_path, port=b.port)
        acked = orjson.loads(redis.hget(f"{stream}:consumers", field) or b"{}")["acked"]
        at_restart = len(high)
        second, out2 = pipeline(2)
        await publisher
        await wait_until(lambda: high[-1] in _tail_ids(out2), 30, "the second run's last event")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        for hub in (a, b):
            stop_process(hub.process)
    ids1, ids2 = _tail_ids(out1), _tail_ids(out2)
    assert at_kill < len(high) and at_restart > at_kill  # killed mid-stream, events flowed
    assert ids1 == high[:len(ids1)]  # the first run: in order, nothing skipped
    assert acked in ids1 and high.index(acked) >= 20  # its acks reached Redis as it went
    after = [i for i in high if _key(i) > _key(acked)]
    # Every event after the last ack, in order, once within the run, then live ones.
    assert ids2 == after
    assert set(high) - set(ids1) - set(ids2) == set()  # lost: none
    duplicates = set(ids1) & set(ids2)
    # Duplicates only for the un-acked tail of the first run (at least once).
    assert all(_key(i) > _key(acked) for i in duplicates)
    assert len(duplicates) == len(ids1) - high.index(acked) - 1


def test_tail_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import build_parser

    args = build_parser().parse_args(["tail", "--consumer", "etl", "--min-severity", "high"])
    assert args.consumer == "etl" and args.min_severity == "high"
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["tail", "--consumer", "a b"])
    assert exited.value.code == 2
    assert "--consumer: consumer must be a name" in capsys.readouterr().err


async def test_binding_late_replays_in_order_from_the_cursor(memory_hub: RunningHub) -> None:
    ws = await connected(memory_hub.ws_url, ALICE)
    await send_json(ws, {"action": "subscribe", "event_types": TYPES})  # live from here
    await recv_type(ws, "subscription_updated")
    start = (await memory_hub.publish("threat_detected", threat(0))).id
    live = [(await memory_hub.publish("threat_detected", threat(n))).id for n in (1, 2)]
    assert [(await next_event(ws))["id"] for _ in range(3)] == [start, *live]
    # Bound now, at an older id: what went out live before is not the consumer's, so it
    # comes again in id order (acks are cumulative).
    await send_json(ws, {"action": "subscribe", "event_types": TYPES, "consumer": "late",
                         "last_event_id": start})
    reply = await recv_type(ws, "subscription_updated")
    assert reply["data"]["consumer"] == {"name": "late", "acked_id": start}
    assert [(await next_event(ws))["id"] for _ in range(2)] == live
    assert (await recv_type(ws, "resumed"))["data"]["replayed"] == 2
    await ws.close()


async def test_cursor_is_shared_by_every_instance(
        redis_hubs: tuple[RunningHub, RunningHub]) -> None:
    a, b = redis_hubs
    ws, _ = await consumer_ws(a, "shared")
    await recv_type(ws, "resumed")
    ids = [(await a.publish("threat_detected", threat(n))).id for n in range(4)]
    assert [(await next_event(ws))["id"] for _ in ids] == ids
    await send_json(ws, {"action": "ack", "id": ids[1]})
    await send_json(ws, {"action": "ping"})
    await recv_type(ws, "pong")
    await ws.close()
    # The other instance finds the cursor in Redis and resumes after it.
    deadline = asyncio.get_running_loop().time() + 10
    while await cursor(b, "shared") != ids[1]:  # the ack's write is asynchronous
        assert asyncio.get_running_loop().time() < deadline, "the ack never reached Redis"
        await asyncio.sleep(0.01)
    ws, data = await consumer_ws(b, "shared")
    assert data["consumer"]["acked_id"] == ids[1]
    assert [(await next_event(ws))["id"] for _ in range(2)] == ids[2:]
    await ws.close()
