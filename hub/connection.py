"""The one connection core every transport builds on.

A connection has two parts, each a small state machine, and each transport only adapts
its wire format to them:

* :class:`Subscriber`, what the dispatcher sees: the replay hold-back (``SubscriberState``:
  LIVE -> REPLAYING -> LIVE, CLOSED), the types it takes, its tenant (the principal).
* :class:`Outbox`, how its frames reach the socket: bounded, created on first use, one
  writer task that exists only while something waits, a direct write when nothing is
  queued and the transport takes it, close-after-flush and abort. Its life is
  :class:`ConnState` (OPEN -> DRAINING -> CLOSED, or OPEN -> CLOSED on an abort); where its
  frames go is :class:`Path` (Socket.IO starts on QUEUED, engine.io's own queue, and moves
  QUEUED -> SWITCHING -> DIRECT once it is on a WebSocket and engine.io's queue is sent).

Expiry (:func:`schedule_expiry`, and :class:`TokenLifetime`: the ``token_expiring``
notice before it and the in-band refresh that moves both) and slow-consumer accounting
(:func:`count_slow`) are written here once. Nothing here imports a transport's library.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from hub.auth import Principal
from hub.consumers import unbind_after_failed_resume
from hub.errors import AuthError, ErrorCode, ProtocolError
from hub.events import Event
from hub.transports.frames import Sink, write_queued

if TYPE_CHECKING:
    from hub.auth import OriginPolicy, TokenVerifier
    from hub.config import Settings
    from hub.consumers import ConsumerCursor, Consumers
    from hub.dispatch.dispatcher import Dispatcher
    from hub.dispatch.filters import EventFilter
    from hub.limits import ConnectionLimits
    from hub.metrics import Metrics
    from hub.refusals import RefusalTracker

log = logging.getLogger("hub.connection")


class Services(Protocol):
    """What a transport uses of its hub instance (hub.app.Hub provides it): named here, on
    the transports' side, so a transport depends on these collaborators, not on the app."""

    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    origins: OriginPolicy
    limits: ConnectionLimits
    refusals: RefusalTracker
    dispatcher: Dispatcher
    consumers: Consumers


class ConnState(enum.Enum):
    """The life of a connection's outbox."""

    OPEN = "open"  # takes frames
    DRAINING = "draining"  # takes nothing more; what is queued still goes out (then a close)
    CLOSED = "closed"  # nothing goes out any more


class Path(enum.Enum):
    """Where an outbox's frames go."""

    ASGI = "asgi"  # no direct transport: texts through the ASGI send, by the writer
    QUEUED = "queued"  # Socket.IO before its WebSocket: engine.io's queue (not this outbox)
    SWITCHING = "switching"  # on a WebSocket, engine.io's queue still being sent: frames wait
    DIRECT = "direct"  # pre-encoded frames straight to the transport


# The states the hot path compares against, bound once (constants, not state).
_OPEN = ConnState.OPEN
_DIRECT = Path.DIRECT


class Outbox:
    """A connection's frames on their way out: bounded, lazy, one writer.

    ``put`` writes a frame straight to the transport when nothing is queued ahead of it and
    the transport takes it without backpressure (no task switch); otherwise the frame is
    queued and one writer task, alive only while frames wait, sends them in order. Live
    events are bounded by ``limit``: ``put`` returns False when one would exceed it (the
    connection is then a slow consumer, see :func:`count_slow`). Everything else (replies
    to the client, replay pages, notices) may take the queue up to ``ceiling``, twice the
    limit, and no further: a client that sends pings but never reads the pongs is a slow
    consumer too, not a slow leak."""

    # What a send raises when the peer is gone (the WebSocket transport adds Starlette's).
    GONE: ClassVar[tuple[type[BaseException], ...]] = ()

    __slots__ = ("_closer", "_queue", "_send", "_sink", "limit", "path", "state", "writer")

    def __init__(self, limit: int, sink: Sink | None = None, *,
                 send: Callable[[Any], Awaitable[None]] | None = None,
                 path: Path | None = None) -> None:
        self.limit = limit
        self._sink = sink
        self._send = send  # for Path.ASGI: sends one queued item
        self.path = path if path is not None else (Path.DIRECT if sink is not None
                                                   else Path.ASGI)
        self.state = ConnState.OPEN
        # Created on first use: an empty deque is ~600 bytes, and most connections never
        # queue anything when frames go straight to the transport.
        self._queue: deque[Any] | None = None
        self.writer: asyncio.Task[None] | None = None
        self._closer: Callable[[], Awaitable[None]] | None = None

    @property
    def sink(self) -> Sink | None:
        return self._sink

    @property
    def queued(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    @property
    def ceiling(self) -> int:
        """The most frames ever queued: the live bound plus as many replies and replay
        frames (a replay page is never larger than the room left under ``limit``)."""
        return 2 * self.limit

    @property
    def open(self) -> bool:
        """It takes frames (not draining, not closed)."""
        return self.state is _OPEN

    @property
    def closing_after_flush(self) -> bool:
        """A close after the flush was asked for (its writer must not be cancelled)."""
        return self._closer is not None

    def room(self) -> int:
        """How many more live frames it takes now."""
        return 0 if self.state is ConnState.CLOSED else self.limit - self.queued

    def put(self, item: Any, bounded: bool) -> bool:
        """Send or queue one frame (for Path.ASGI, one item for ``send``). False: a
        ``bounded`` one found the outbox full (nothing was queued)."""
        if self.state is not _OPEN:
            return True
        if self.path is _DIRECT and not self._queue:
            sink = self._sink
            if sink is not None and sink.ready():
                # Nothing queued ahead of it and no backpressure: out now, no task switch.
                sink.write(item)
                return True
        if self.queued >= (self.limit if bounded else self.ceiling):
            return False
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)
        if self.path is not Path.SWITCHING:  # while switching, the switch-over drains
            self._start_writer()
        return True

    def _start_writer(self) -> None:
        # A writer task exists only while something waits to be sent: an idle connection
        # (most of them, most of the time) costs no task.
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._run())

    async def _drain(self) -> None:
        queue = self._queue
        if queue is None:
            return
        sink = self._sink
        if sink is not None:
            await write_queued(sink, queue)
            return
        send = self._send
        assert send is not None
        while queue:
            await send(queue.popleft())

    async def _run(self) -> None:
        try:
            await self._drain()
            closer = self._closer
            if closer is not None and self.state is ConnState.DRAINING:
                self.state = ConnState.CLOSED
                await closer()
        except self.GONE:
            # The peer went away (or the socket was closed under us): nothing left to send.
            self.state = ConnState.CLOSED
        finally:
            # Idle again: an empty deque (~0.6 KB) and a finished task (~0.6 KB) are not
            # kept on the connection until its next burst.
            if self._queue is not None and not self._queue:
                self._queue = None
            if self.writer is asyncio.current_task():
                self.writer = None

    def switch_over(self, sink: Sink, ready: Callable[[], Awaitable[object]]) -> None:
        """QUEUED -> SWITCHING -> DIRECT: frames go to ``sink`` once ``ready()`` returns
        (what another queue holds has been sent); until then they wait here, in order."""
        if self._sink is not None or self.state is not ConnState.OPEN:
            return
        self._sink = sink
        self.path = Path.SWITCHING
        self.writer = asyncio.get_running_loop().create_task(self._switch(ready))

    async def _switch(self, ready: Callable[[], Awaitable[object]]) -> None:
        await ready()
        self.path = Path.DIRECT
        await self._run()

    def close_after_flush(self, closer: Callable[[], Awaitable[None]] | None = None) -> None:
        """OPEN -> DRAINING: take nothing more, send what is queued, then run ``closer``
        (without one, the transport closes it itself once :meth:`wait_drained` returns)."""
        if self.state is not ConnState.OPEN:
            return
        self.state = ConnState.DRAINING
        self._closer = closer
        if closer is not None and self.path in (Path.DIRECT, Path.ASGI):
            self._start_writer()

    def abort(self) -> bool:
        """-> CLOSED: drop what is queued and stop the writer. False if it was closed."""
        if self.state is ConnState.CLOSED:
            return False
        self.state = ConnState.CLOSED
        if self._queue is not None:
            self._queue.clear()
        if self.writer is not None:
            # The writer may be stuck in a send to a client that does not read; a frame
            # already handed to the transport stays whole, so cancelling it is safe.
            self.writer.cancel()
        return True

    async def wait_drained(self) -> None:
        """Until nothing is queued (or the connection is gone): until the writer is done,
        except that a switch-over with nothing of ours queued has nothing to wait for (it
        may wait on engine.io's queue for long)."""
        writer = self.writer
        while writer is not None and not writer.done():
            if self.path is Path.SWITCHING and not self._queue:
                return
            await asyncio.wait((writer,))
            writer = self.writer


def schedule_expiry(principal: Principal, leeway: float,
                    expire: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Call ``expire`` when the principal's token expires (plus the verifier's leeway)."""
    expires_at = principal.expires_at
    if expires_at is None:
        return None
    delay = max(0.0, expires_at + leeway - time.time())
    return asyncio.get_running_loop().call_later(delay, expire)


class TokenLifetime:
    """A connection's token over time: ``token_expiring`` is sent ``lead`` seconds before
    it expires, the connection is closed when it does (plus the verifier's leeway), and
    :meth:`refresh` replaces it in-band (same user and tenant) and moves both timers.

    Every transport uses this one: it calls ``notify(name, data)`` for the notice (the
    transport sends it in order with its events) and ``expire()`` at expiry."""

    __slots__ = ("_expire", "_notice", "_noticed", "_notify", "_owner", "_timer", "lead",
                 "leeway")

    def __init__(self, owner: Subscriber, *, leeway: float, lead: float,
                 expire: Callable[[], None],
                 notify: Callable[[str, dict[str, Any]], None]) -> None:
        self._owner = owner
        self.leeway = leeway
        self.lead = lead
        self._expire = expire
        self._notify = notify
        self._timer: asyncio.TimerHandle | None = None
        self._notice: asyncio.TimerHandle | None = None
        # The exp the notice was sent for: once per exp, so a refresh that does not move it
        # (the same token again) gets no second notice at once, and no refresh loop.
        self._noticed: float | None = None
        self._schedule()

    @property
    def expires_at(self) -> float | None:
        return self._owner.principal.expires_at

    def _schedule(self) -> None:
        # One timer at a time (each is ~200 bytes on every connection): the notice's, which
        # then starts the expiry's, or the expiry's alone once the notice went out.
        self.cancel()
        expires_at = self.expires_at
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        now = time.time()
        if self.lead > 0 and self._noticed != expires_at:
            # A token that lives less than the lead is told at once: refresh now.
            self._notice = loop.call_later(max(0.0, expires_at - self.lead - now),
                                           self._expiring)
        else:
            self._arm_expiry(expires_at)

    def _arm_expiry(self, expires_at: float) -> None:
        delay = max(0.0, expires_at + self.leeway - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expiring(self) -> None:
        self._notice = None
        expires_at = self.expires_at
        if expires_at is None:
            return
        self._arm_expiry(expires_at)
        self._noticed = expires_at
        self._notify("token_expiring", {
            "exp": expires_at, "expires_in_s": round(max(0.0, expires_at - time.time()), 3),
            "message": "the token expires soon; send a refresh with a new token",
        })

    def refresh(self, verifier: TokenVerifier, token: object) -> Principal:
        """Verify ``token`` and make it the connection's (raises AuthError, and the old
        token and its expiry stand): it must name the same user and tenant."""
        if not isinstance(token, str) or not token:
            raise AuthError("refresh needs a token", code=ErrorCode.MISSING_TOKEN)
        principal = verifier.verify(token)
        current = self._owner.principal
        if principal.user_id != current.user_id or principal.tenant != current.tenant:
            raise AuthError("the refresh token is for another user or tenant",
                            code=ErrorCode.SUBJECT_MISMATCH)
        self._owner.principal = principal
        self._schedule()
        return principal

    def refreshed_message(self) -> dict[str, Any]:
        """What ``token_refreshed`` (or the Socket.IO ack) says."""
        principal = self._owner.principal
        return {"user_id": principal.user_id, "exp": principal.expires_at}

    def cancel(self) -> None:
        for timer in (self._timer, self._notice):
            if timer is not None:
                timer.cancel()
        self._timer = self._notice = None


def count_slow(metrics: Metrics, log: logging.Logger, transport: str, connection_id: str,
               user_id: str, dropped: int) -> None:
    """A slow consumer is cut off: count it and what it loses (its queued frames and the
    event that overflowed it), and log it."""
    metrics.slow_consumers.labels(transport).inc()
    metrics.dropped.labels("slow_consumer").inc(dropped)
    log.warning("closing slow consumer %s (user %s)", connection_id, user_id)


class SubscriberState(enum.Enum):
    LIVE = "live"
    REPLAYING = "replaying"
    CLOSED = "closed"


class Subscriber(abc.ABC):
    """A connection of either transport as the dispatcher sees it.

    ``push`` never blocks: it hands the event to the connection's bounded outbox and one
    writer sends it. While a resume replays history, live events are held back and sent
    after the replay, skipping any the replay already sent, so the seam has no gap and no
    duplicate. What is held is bounded (``hold_limit``): past it the held events are
    dropped and the replay reads them from the history instead (they are there: the
    window and the stream hold everything this instance delivered).

    A replay is sent page by page as the outbox has room (``replay_room`` / ``wait_room``,
    which transports with a bounded outbox override), so a connection's memory stays
    within its outbox bound whatever it asks to be replayed.
    """

    transport: str

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.since = time.time()  # when it connected (GET /admin/connections)
        # None: no subscribe yet, every type is delivered (the spec's default).
        self.types: set[str] | None = None
        # A server-side filter (hub.dispatch.filters): narrows what the types and the
        # tenant let through, for live events and replays alike. None: no filter.
        self.filter: EventFilter | None = None
        # A durable consumer this connection is bound to (hub.consumers): its cursor and
        # acks. None: a plain subscription.
        self.consumer: ConsumerCursor | None = None
        self.state = SubscriberState.LIVE
        self._held: list[Event] = []
        self.held_overflow = False  # held events were dropped: the replay must re-read
        self.hold_limit = 1_000
        # A resume owns the hold from its start to its end; only one runs at a time.
        self.resuming = False
        # Holding live events until the client's first message (see hold_for_first_message).
        self._first_hold: asyncio.TimerHandle | None = None
        # After a replay: the newest id it covered. Live events up to it were already sent
        # (this instance may read the stream later than the replay read history).
        self._skip_until: tuple[int, int] | None = None
        # What this connection has been sent live, for a resume not to send it twice:
        # per type, the stream position when it joined that room, and the newest id sent.
        self.live_since: dict[str, tuple[int, int]] = {}
        self.last_sent: tuple[int, int] = (0, 0)

    def push(self, event: Event) -> None:
        if self.state is SubscriberState.LIVE:
            if self._skip_until is not None:
                if event.key <= self._skip_until:
                    return
                self._skip_until = None
            self.last_sent = event.key
            self._send(event)
        elif self.state is SubscriberState.REPLAYING:
            if len(self._held) < self.hold_limit:
                self._held.append(event)
            elif self._first_hold is not None:
                # Holding for a first message that is slow to come: stop holding.
                self.first_message_seen()
                self.push(event)
            else:
                # Bounded: drop what is held; the replay fetches it from the history.
                self._held = []
                self.held_overflow = True

    def accepts(self, event: Event) -> bool:
        """Whether its filter lets ``event`` through (no filter: every event)."""
        flt = self.filter
        return flt is None or flt.matches(event)

    def was_sent(self, event: Event) -> bool:
        """Whether ``event`` already reached this connection live."""
        since = self.live_since.get(event.type)
        return since is not None and since < event.key <= self.last_sent

    def begin_replay(self) -> None:
        """Hold live events back (idempotent: events already held stay held)."""
        if self.state is SubscriberState.LIVE:
            self.state = SubscriberState.REPLAYING

    def restart_hold(self) -> None:
        """After an overflow: forget what is held (all of it is in the history now)."""
        self._held = []
        self.held_overflow = False

    def replay(self, events: Iterable[Event]) -> int:
        """Send retained events (already filtered); return how many were sent."""
        sent = 0
        for event in events:
            # Not bounded by the outbox limit here: the dispatcher sends a page only as
            # large as ``replay_room`` (a client cut off as a slow consumer must be able to
            # catch up, so a replay never makes it one).
            self._send(event, replay=True)
            self._skip_until = self.last_sent = event.key
            sent += 1
        return sent

    def replayed_until(self, key: tuple[int, int]) -> None:
        """The replay covered every event up to ``key`` (some filtered out): live events
        up to it are not to be sent again."""
        if self._skip_until is None or key > self._skip_until:
            self._skip_until = key

    def end_replay(self) -> None:
        if self.state is not SubscriberState.REPLAYING or self.resuming:
            return
        held, self._held = self._held, []
        self.held_overflow = False
        self.state = SubscriberState.LIVE
        types = self.types
        for event in held:
            # Held before a subscribe narrowed the types: those no longer wanted stay out.
            if types is None or event.type in types:
                self.push(event)

    def hold_for_first_message(self, seconds: float) -> None:
        """Hold live events until the client's first message has been handled (or for
        ``seconds``): a client that resumes with a subscribe message right after connecting
        must not get a live event ahead of its replay."""
        if seconds <= 0 or self.state is not SubscriberState.LIVE:
            return
        self.begin_replay()
        self._first_hold = asyncio.get_running_loop().call_later(
            seconds, self.first_message_seen)

    def first_message_seen(self) -> None:
        """End the hold for the first message (a no-op once it ended, or if a resume has
        taken it over)."""
        timer, self._first_hold = self._first_hold, None
        if timer is None:
            return
        timer.cancel()
        self.end_replay()

    def claim_hold(self) -> None:
        """A resume starts: it takes over any hold and ends it itself."""
        if self._first_hold is not None:
            self._first_hold.cancel()
            self._first_hold = None
        self.resuming = True
        self.begin_replay()

    def release_hold(self) -> None:
        """The resume ended (or failed): let live events through."""
        self.resuming = False
        self.end_replay()

    # -- what a transport with a bounded outbox tells the replay --------------------------
    def replay_room(self) -> int:
        """How many events the outbox takes now without exceeding its bound."""
        return 1 << 30

    async def wait_room(self) -> None:  # noqa: B027 - optional hook
        """Wait until the outbox has room again (or the connection is gone)."""

    @property
    def closed(self) -> bool:
        return self.state is SubscriberState.CLOSED

    def rooms_changed(self, joined: set[str], left: set[str]) -> None:  # noqa: B027 - optional hook
        """Hook for transports that mirror the rooms elsewhere (python-socketio's manager)."""

    def close_after_error(self) -> None:  # noqa: B027 - optional hook
        """A send to this connection raised: close it (the dispatcher dropped it already)."""

    def mark_closed(self) -> None:
        self.state = SubscriberState.CLOSED
        self._held = []
        if self._first_hold is not None:
            self._first_hold.cancel()
            self._first_hold = None

    def send_error(self, exc: ProtocolError) -> None:
        """Tell the client what was wrong (the connection stays open)."""
        self.send_control("error", {"code": exc.code, "message": exc.message})

    def notify_truncated(self, last_event_id: str, first_retained: str | None) -> None:
        """Tell the client that events after ``last_event_id`` are no longer retained
        (a consumer: that it fell further behind than retention keeps, and what it lost)."""
        data: dict[str, Any] = {
            "last_event_id": last_event_id, "first_retained_id": first_retained,
            "message": "events after last_event_id were no longer retained; "
                       "the replay starts at first_retained_id",
        }
        if self.consumer is not None:
            data["consumer"] = self.consumer.name
            data["message"] = ("consumer fell behind by more than retention keeps "
                               "(HUB_CONSUMER_MAX_LAG): the events after last_event_id and "
                               "before first_retained_id are lost to it")
        self.send_control("history_truncated", data)

    @abc.abstractmethod
    def send_control(self, name: str, data: dict[str, Any]) -> None:
        """Send a hub message that is not an event (``resumed``, ``history_truncated``…),
        in order with the events around it."""

    @abc.abstractmethod
    def _send(self, event: Event, replay: bool = False) -> None:
        """Queue one event for the writer; on overflow (not during a replay), disconnect
        as a slow consumer."""


class OutboxSubscriber(Subscriber):
    """A connection whose frames all go through one :class:`Outbox` (``/ws/events``,
    SSE): the replay's hooks are the outbox's room and drain."""

    outbox: Outbox
    connection_id: str
    resume_task: asyncio.Task[Any] | None = None  # the replay running, if any

    @property
    def queued(self) -> int:
        return self.outbox.queued

    def replay_room(self) -> int:
        return self.outbox.room()

    async def wait_room(self) -> None:
        # The writer runs until the outbox is empty (or the connection is gone).
        await self.outbox.wait_drained()

    @property
    def closed(self) -> bool:
        # Closing after a flush (shutdown, expiry) takes nothing more: a replay stops there.
        return not self.outbox.open or super().closed

    # -- a resume that runs while client messages keep being read -----------------------
    def track_resume(self, task: asyncio.Task[Any]) -> None:
        """Keep the replay ``task`` of ``Dispatcher.start_resume`` (cancelled with the
        connection, :meth:`cancel_resume`) and tell the client how it ended: ``resumed``,
        or an ``error`` (the connection stays open and live events continue)."""
        self.resume_task = task
        task.add_done_callback(self._resume_ended)

    def cancel_resume(self) -> None:
        if self.resume_task is not None:
            self.resume_task.cancel()

    def _resume_ended(self, task: asyncio.Task[Any]) -> None:
        if self.resume_task is task:
            self.resume_task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            unbound = unbind_after_failed_resume(self)
            if unbound is not None:
                self.send_error(unbound)
        if isinstance(exc, ProtocolError):
            self.send_error(exc)
        elif exc is not None:
            log.error("resume failed on %s", self.connection_id, exc_info=exc)
            self.send_error(ProtocolError("the resume failed; live events continue",
                                          code=ErrorCode.HISTORY_UNAVAILABLE))
        else:
            self.send_control("resumed", task.result().message())
