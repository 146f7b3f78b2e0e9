"""hub.client: subscribe() against real hub servers — filtering, auth failure, and
reconnect-and-resume across a restart, a slow-consumer disconnect and a shutdown."""

from __future__ import annotations

import asyncio

import pytest

from hub import Publisher
from hub.client import (
    AuthenticationFailed,
    ConnectionLost,
    Notice,
    NoticeKind,
    Subscription,
    SubscriptionRefused,
    events_url,
    subscribe,
)
from hub.events import Event
from tests.conftest import RedisServer, RunningHub, free_port, make_settings, make_token, run_hub
from tests.helpers import HEALTH, THREAT


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/events"),
    ("https://hub.example.com/", "wss://hub.example.com/ws/events"),
    ("ws://h:1/ws/events", "ws://h:1/ws/events"),
    ("http://h/prefix", "ws://h/prefix/ws/events"),
    ("localhost:8000", "ws://localhost:8000/ws/events"),
])
def test_events_url(url: str, expected: str) -> None:
    assert events_url(url) == expected


def test_events_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="not a hub URL"):
        events_url("ftp://h/")


class Pump:
    """Iterates a subscription in a task (as an application would) into a queue."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.subscription:
            self.queue.put_nowait(event)

    async def take(self, n: int, *, within: float = 20) -> list[Event]:
        """The next ``n`` events, skipping system_status (instances announcing themselves)."""
        got: list[Event] = []
        while len(got) < n:
            get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({get, self.task}, timeout=within,
                                         return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if self.task in done:
                    self.task.result()  # raise what ended the subscription
                raise AssertionError(f"timed out after {len(got)} of {n} events")
            event = get.result()
            if event.type != "system_status":
                got.append(event)
        return got

    async def close(self) -> None:
        await self.subscription.aclose()
        await asyncio.wait_for(self.task, 10)


async def test_receives_events_of_the_requested_types(any_hub: RunningHub) -> None:
    notices: list[Notice] = []
    pump = Pump(subscribe(any_hub.url, make_token(), types=["provider_health_change"],
                          on_notice=notices.append))
    await _until_subscribed(any_hub)
    await any_hub.publish("threat_detected", THREAT)
    health = await any_hub.publish("provider_health_change", HEALTH)
    [event] = await pump.take(1)
    assert (event.id, event.type, event.data["provider"]) == (
        health.id, "provider_health_change", "openai")
    assert pump.subscription.last_event_id == health.id
    assert pump.subscription.instance_id == any_hub.hub.settings.instance_id
    assert notices[0].kind is NoticeKind.CONNECTED
    await pump.close()


async def _until_subscribed(hub: RunningHub) -> None:
    from tests.helpers import wait_until

    def narrowed() -> bool:
        conns = list(hub.hub.websocket.connections)
        return len(conns) == 1 and conns[0].types is not None

    await wait_until(narrowed, what="the client's subscribe message")


async def test_all_types_by_default(memory_hub: RunningHub) -> None:
    pump = Pump(subscribe(memory_hub.url, make_token()))
    await _until_connected(memory_hub)
    a = await memory_hub.publish("threat_detected", THREAT)
    b = await memory_hub.publish("provider_health_change", HEALTH)
    assert [e.id for e in await pump.take(2)] == [a.id, b.id]
    await pump.close()


async def _until_connected(hub: RunningHub) -> None:
    from tests.helpers import wait_until

    await wait_until(lambda: len(hub.hub.websocket.connections) == 1, what="a connection")


async def test_bad_token_raises_at_once(memory_hub: RunningHub) -> None:
    with pytest.raises(AuthenticationFailed, match="refused the token"):
        async for _ in subscribe(memory_hub.url, "not-a-token"):
            pass


async def test_expired_token_raises(memory_hub: RunningHub) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        async for _ in subscribe(memory_hub.url, make_token(ttl=-60)):
            pass
    assert info.value.code == "authentication_failed"


async def test_unknown_type_is_reported_and_the_known_ones_apply(memory_hub: RunningHub) -> None:
    notices: list[Notice] = []
    reported = asyncio.Event()

    def note(notice: Notice) -> None:
        notices.append(notice)
        if notice.kind is NoticeKind.ERROR:
            reported.set()

    async def first_event() -> Event:
        async for event in subscribe(memory_hub.url, make_token(),
                                     types=["nope", "threat_detected"], on_notice=note):
            return event
        raise AssertionError("the stream ended")

    task = asyncio.create_task(first_event())
    await asyncio.wait_for(reported.wait(), 10)
    threat = await memory_hub.publish("threat_detected", THREAT)
    assert (await asyncio.wait_for(task, 10)).id == threat.id
    [error] = [n for n in notices if n.kind is NoticeKind.ERROR]
    assert "nope" in error.message
    assert error.data["unknown_event_types"] == ["nope"]


async def test_a_malformed_subscription_is_refused(memory_hub: RunningHub) -> None:
    with pytest.raises(SubscriptionRefused, match="more than 64"):
        async for _ in subscribe(memory_hub.url, make_token(),
                                 types=[f"type{n}" for n in range(65)]):
            pass


async def test_gives_up_after_retry_for() -> None:
    port = free_port()  # nothing listens here
    notices: list[Notice] = []
    with pytest.raises(ConnectionLost, match="could not reconnect within"):
        async for _ in subscribe(f"http://127.0.0.1:{port}", make_token(), retry_for=0.3,
                                 backoff_base=0.05, on_notice=notices.append):
            pass
    assert all(n.kind is NoticeKind.DISCONNECTED for n in notices)


async def test_resumes_across_a_restart(redis_server: RedisServer) -> None:
    """Events published while the only instance is down arrive after it is back, once."""
    port = free_port()
    first = make_settings(redis_url=redis_server.url)
    notices: list[Notice] = []
    async with run_hub(first, port=port) as hub:
        pump = Pump(subscribe(hub.url, make_token(), types=["threat_detected"],
                              backoff_base=0.05, on_notice=notices.append))
        await _until_subscribed(hub)
        before = await hub.publish("threat_detected", THREAT)
        assert [e.id for e in await pump.take(1)] == [before.id]
    async with Publisher(redis_server.url, stream_key=first.stream_key) as publisher:
        missed = [(await publisher.publish("threat_detected", {**THREAT, "n": i})).id
                  for i in range(3)]
    async with run_hub(first.replace(instance_id=first.instance_id + "-2"), port=port) as hub:
        assert [e.id for e in await pump.take(3)] == missed
        live = await hub.publish("threat_detected", THREAT)
        assert [e.id for e in await pump.take(1)] == [live.id]
        assert pump.subscription.instance_id == hub.hub.settings.instance_id
        await pump.close()
    assert [n.data["replayed"] for n in notices if n.kind is NoticeKind.RESUMED] == [3]
    assert any(n.kind is NoticeKind.DISCONNECTED for n in notices)


async def test_reconnects_after_going_away_and_misses_nothing(redis_server: RedisServer
                                                              ) -> None:
    """Close 1001 from one instance: the client reconnects and resumes; what was published
    on another instance meanwhile arrives."""
    a = make_settings(redis_url=redis_server.url)
    b = a.replace(instance_id=a.instance_id + "-b")
    port = free_port()
    async with run_hub(b) as other:
        async with run_hub(a, port=port) as hub:
            pump = Pump(subscribe(hub.url, make_token(), types=["threat_detected"],
                                  backoff_base=0.05))
            await _until_subscribed(hub)
            first = await hub.publish("threat_detected", THREAT)
            assert [e.id for e in await pump.take(1)] == [first.id]
        gone = await other.publish("threat_detected", THREAT)
        async with run_hub(a, port=port):
            assert [e.id for e in await pump.take(1)] == [gone.id]
            await pump.close()


async def test_slow_consumer_disconnect_resumes() -> None:
    """After a 4008 (outbox full) the client reconnects and the replay brings back what
    was dropped (the replay itself is not bounded by the outbox)."""
    notices: list[Notice] = []
    kicked = asyncio.Event()

    def on_notice(notice: Notice) -> None:
        notices.append(notice)
        if notice.kind is NoticeKind.DISCONNECTED and notice.data["code"] == 4008:
            kicked.set()

    async with run_hub(make_settings(outbox_limit=2)) as hub:
        pump = Pump(subscribe(hub.url, make_token(), types=["threat_detected"],
                              backoff_base=0.05, on_notice=on_notice))
        await _until_subscribed(hub)
        first = await hub.publish("threat_detected", THREAT)
        assert [e.id for e in await pump.take(1)] == [first.id]
        # Big events published without yielding to the client, which therefore cannot
        # read: the socket buffers fill, then the two-event outbox overflows.
        slow = hub.hub.metrics.slow_consumers.labels("websocket")
        pad = "x" * 60_000
        burst: list[str] = []
        while slow._value.get() == 0 and len(burst) < 2_000:
            burst.append((await hub.publish("threat_detected", {**THREAT, "pad": pad})).id)
        assert slow._value.get() == 1
        await asyncio.wait_for(kicked.wait(), 10)
        assert [e.id for e in await pump.take(len(burst))] == burst
        await pump.close()
