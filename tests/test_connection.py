"""The connection core (hub.connection) without a server: the outbox over a real socket
pair with real kernel backpressure, the ASGI path over an in-process send, the subscriber's
replay hold-back, expiry. What the end-to-end tests show through both transports, each rule
here once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hub.auth import Principal
from hub.connection import ConnState, Outbox, Path, Subscriber, schedule_expiry
from hub.events import Event
from hub.transports.frames import text_frame


class _Flow(asyncio.Protocol):
    """Flow control as uvicorn's protocol keeps it: ``writable`` cleared while the
    transport pushes back, set again when it drains or the connection is lost."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()


class SocketSink:
    """A real TCP-like socket's transport as an outbox sink (hub.transports.frames.Sink)."""

    def __init__(self, flow: _Flow) -> None:
        assert flow.transport is not None
        self.flow = flow
        self.transport = flow.transport
        self.writes = 0

    def ready(self) -> bool:
        return self.flow.writable.is_set() and not self.closed

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()

    def write(self, frame: bytes) -> None:
        self.writes += 1
        self.transport.write(frame)

    async def wait_ready(self) -> None:
        await self.flow.writable.wait()


class Pair:
    def __init__(self, sink: SocketSink, reader: asyncio.StreamReader) -> None:
        self.sink = sink
        self.reader = reader

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 10)

    def push_back(self) -> None:
        """Fill the kernel's buffers and the transport's past its high-water mark."""
        chunk = b"x" * 65536
        while self.sink.ready():
            self.sink.transport.write(chunk)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    loop = asyncio.get_running_loop()
    _, flow = await loop.connect_accepted_socket(_Flow, ours)
    flow.transport.set_write_buffer_limits(high=8192)  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(sock=theirs, limit=1 << 16)
    yield Pair(SocketSink(flow), reader)
    flow.transport.close()  # type: ignore[union-attr]
    writer.close()


def state_of(outbox: Outbox) -> ConnState:  # read afresh (mypy narrows attributes)
    return outbox.state


def path_of(outbox: Outbox) -> Path:
    return outbox.path


def frame(n: int) -> bytes:
    return text_frame(f"frame {n:04d}".encode())


FRAME = len(frame(0))


async def drain_filler(pair: Pair) -> None:
    """Read the filler written by push_back, up to the first frame's first byte."""
    while True:
        try:
            await asyncio.wait_for(pair.reader.readuntil(b"\x81"), 10)
            return
        except asyncio.LimitOverrunError as exc:
            await pair.read(exc.consumed)


async def read_frames(pair: Pair, count: int, *, after_filler: bool = False) -> list[bytes]:
    data = b""
    if after_filler:
        await drain_filler(pair)
        data = b"\x81" + await pair.read(FRAME - 1)
        count -= 1
    data += await pair.read(FRAME * count)
    return [data[i:i + FRAME] for i in range(0, len(data), FRAME)]


async def test_a_frame_goes_straight_out_when_nothing_is_queued(pair: Pair) -> None:
    outbox = Outbox(10, pair.sink)
    assert outbox.path is Path.DIRECT
    assert outbox.put(frame(1), bounded=True)
    assert outbox.writer is None and outbox.queued == 0  # no task, no deque
    assert await read_frames(pair, 1) == [frame(1)]


async def test_frames_queue_behind_backpressure_and_go_out_in_order(pair: Pair) -> None:
    outbox = Outbox(100, pair.sink)
    pair.push_back()
    for n in range(20):
        assert outbox.put(frame(n), bounded=True)
    assert outbox.queued == 20 and outbox.writer is not None
    assert pair.sink.writes == 0  # nothing overtook the queue
    got = await read_frames(pair, 20, after_filler=True)
    assert got == [frame(n) for n in range(20)]
    await outbox.wait_drained()
    assert outbox.queued == 0
    # Once empty, frames go direct again.
    assert outbox.put(frame(99), bounded=True)
    assert await read_frames(pair, 1) == [frame(99)]


async def test_a_live_frame_past_the_limit_is_refused_and_replies_are_not(pair: Pair) -> None:
    outbox = Outbox(3, pair.sink)
    pair.push_back()
    assert all(outbox.put(frame(n), bounded=True) for n in range(3))
    assert outbox.room() == 0
    assert not outbox.put(frame(3), bounded=True)  # a slow consumer
    assert outbox.queued == 3
    assert outbox.put(frame(4), bounded=False)  # a reply or a replayed event: taken
    assert outbox.queued == 4


async def test_close_after_flush_sends_everything_then_closes(pair: Pair) -> None:
    closed: list[int] = []

    async def closer() -> None:
        closed.append(outbox.queued)

    outbox = Outbox(100, pair.sink)
    pair.push_back()
    for n in range(5):
        outbox.put(frame(n), bounded=True)
    outbox.close_after_flush(closer)
    assert outbox.state is ConnState.DRAINING and outbox.closing_after_flush
    assert outbox.put(frame(9), bounded=True)  # taken as a no-op: nothing more goes out
    assert outbox.queued == 5
    assert await read_frames(pair, 5, after_filler=True) == [frame(n) for n in range(5)]
    await outbox.wait_drained()
    assert closed == [0] and state_of(outbox) is ConnState.CLOSED


async def test_abort_drops_the_queue_and_stops_the_writer(pair: Pair) -> None:
    outbox = Outbox(100, pair.sink)
    pair.push_back()
    for n in range(5):
        outbox.put(frame(n), bounded=True)
    writer = outbox.writer
    assert writer is not None
    assert outbox.abort()
    assert outbox.state is ConnState.CLOSED and outbox.queued == 0 and outbox.room() == 0
    await outbox.wait_drained()
    assert writer.cancelled()
    assert not outbox.abort()  # once
    assert outbox.put(frame(6), bounded=True) and outbox.queued == 0


async def test_an_abort_while_draining_still_closes_at_once(pair: Pair) -> None:
    ran: list[bool] = []

    async def closer() -> None:
        ran.append(True)

    outbox = Outbox(100, pair.sink)
    pair.push_back()
    outbox.put(frame(0), bounded=True)
    outbox.close_after_flush(closer)
    assert outbox.abort()
    await outbox.wait_drained()
    assert ran == [] and outbox.queued == 0


async def test_switch_over_holds_frames_until_the_other_queue_is_sent(pair: Pair) -> None:
    outbox = Outbox(100, path=Path.QUEUED)
    other_queue_sent = asyncio.Event()
    outbox.switch_over(pair.sink, other_queue_sent.wait)
    assert outbox.path is Path.SWITCHING
    for n in range(3):
        outbox.put(frame(n), bounded=True)
    await asyncio.sleep(0)
    assert pair.sink.writes == 0 and outbox.queued == 3  # waiting for the other queue
    other_queue_sent.set()
    assert await read_frames(pair, 3) == [frame(n) for n in range(3)]
    await outbox.wait_drained()
    assert path_of(outbox) is Path.DIRECT
    outbox.put(frame(3), bounded=True)
    assert outbox.writer is None  # direct, no task (the finished switch-over is released)
    assert await read_frames(pair, 1) == [frame(3)]


async def test_switch_over_is_refused_once_closing() -> None:
    outbox = Outbox(10, path=Path.QUEUED)
    outbox.close_after_flush()
    never = asyncio.Event()
    outbox.switch_over(object(), never.wait)  # type: ignore[arg-type]
    assert outbox.path is Path.QUEUED and outbox.sink is None and outbox.writer is None


class _Gone(Exception):
    pass


class _AsgiOutbox(Outbox):
    __slots__ = ()
    GONE = (_Gone,)


async def test_the_asgi_path_sends_items_in_order_through_send() -> None:
    sent: list[str] = []
    gate = asyncio.Event()

    async def send(item: Any) -> None:
        await gate.wait()
        sent.append(item)

    outbox = _AsgiOutbox(10, send=send)
    assert outbox.path is Path.ASGI
    for n in range(4):
        outbox.put(f"text {n}", bounded=True)
    assert outbox.queued == 4  # never direct without a sink
    gate.set()
    await outbox.wait_drained()
    assert sent == [f"text {n}" for n in range(4)]


async def test_a_peer_gone_on_the_asgi_path_closes_the_outbox() -> None:
    async def send(item: Any) -> None:
        raise _Gone

    outbox = _AsgiOutbox(10, send=send)
    outbox.put("lost", bounded=True)
    writer = outbox.writer
    await outbox.wait_drained()
    assert outbox.state is ConnState.CLOSED
    assert writer is not None and writer.exception() is None
    assert outbox.writer is None  # a finished writer is not kept


# -- the subscriber: replay hold-back ----------------------------------------------------

def principal(expires_at: float | None) -> Principal:
    return Principal(user_id="u", roles=frozenset({"viewer"}), tenant=None,
                     expires_at=expires_at, is_admin=False, can_publish=False)


class Recorder(Subscriber):
    transport = "test"

    def __init__(self) -> None:
        super().__init__(principal(None))
        self.sent: list[tuple[str, bool]] = []

    def _send(self, event: Event, replay: bool = False) -> None:
        self.sent.append((event.id, replay))

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        self.sent.append((name, False))


def event(ms: int) -> Event:
    return Event(id=f"{ms}-0", type="system_status", timestamp="2025-01-01T00:00:00Z",
                 data={})


def test_live_events_during_a_replay_follow_it_without_duplicates() -> None:
    sub = Recorder()
    sub.claim_hold()
    sub.push(event(2))  # live, while the replay runs: held
    sub.push(event(3))
    assert sub.sent == []
    sub.replay([event(1), event(2)])  # the replay read 2 as well
    sub.release_hold()
    assert sub.sent == [("1-0", True), ("2-0", True), ("3-0", False)]


def test_a_hold_past_its_bound_is_dropped_for_the_replay_to_reread() -> None:
    sub = Recorder()
    sub.hold_limit = 2
    sub.claim_hold()
    for ms in range(1, 4):
        sub.push(event(ms))
    assert sub.held_overflow
    sub.restart_hold()
    sub.replay([event(1), event(2), event(3)])
    sub.release_hold()
    assert [id_ for id_, _ in sub.sent] == ["1-0", "2-0", "3-0"]


async def test_the_first_message_hold_ends_with_the_first_message() -> None:
    sub = Recorder()
    sub.hold_for_first_message(60)
    sub.push(event(1))
    assert sub.sent == []
    sub.first_message_seen()
    assert sub.sent == [("1-0", False)]


async def test_expiry_fires_at_the_tokens_expiry_plus_leeway() -> None:
    fired = asyncio.Event()
    expired = principal(time.time() - 1)
    assert schedule_expiry(expired, 0.0, fired.set) is not None
    await asyncio.wait_for(fired.wait(), 10)
    forever = principal(None)
    assert schedule_expiry(forever, 0.0, fired.set) is None


async def test_a_switch_over_with_nothing_queued_is_drained_already(pair: Pair) -> None:
    outbox = Outbox(10, path=Path.QUEUED)
    never = asyncio.Event()
    outbox.switch_over(pair.sink, never.wait)  # engine.io's queue is slow to go out
    await asyncio.wait_for(outbox.wait_drained(), 10)  # nothing of ours waits
    outbox.put(frame(0), bounded=True)
    waiting = asyncio.create_task(outbox.wait_drained())
    await asyncio.sleep(0)
    assert not waiting.done()
    never.set()
    await asyncio.wait_for(waiting, 10)
    assert await read_frames(pair, 1) == [frame(0)]
