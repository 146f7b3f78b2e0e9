"""A Python client for ``/ws/events`` that survives restarts, for automation pipelines::

    from hub.client import subscribe

    async for event in subscribe("http://hub:8000", token, types=["threat_detected"]):
        print(event.id, event.type, event.data)

    # or, to stop it from elsewhere: async with subscribe(...) as events: async for ...

It reconnects with capped, jittered backoff and resumes from the last id it yielded, so a
hub restart, a deploy (close 1001) or a slow-consumer disconnect (4008) loses nothing the
hub still retains and yields nothing twice. A refused token (close 4003) raises
:class:`AuthenticationFailed` at once: retrying with the same token cannot succeed.

The token may be a *source* instead of a string: a callable returning the current token
(or an awaitable of it), e.g. :func:`token_file` that re-reads a file. With a source the
client refreshes in-band when the hub says ``token_expiring`` and connects with a fresh
token after a disconnect, so it outlives its tokens::

    async for event in subscribe(url, token_file("/run/secrets/hub-token")): ...

Exceptions (all derive from :class:`~hub.errors.HubError`)::

    ClientError
    ├── AuthenticationFailed   the hub refused the token (close 4003)
    ├── SubscriptionRefused    the hub refused the subscription (malformed types, bad id)
    └── ConnectionLost         could not reconnect within ``retry_for`` seconds
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from hub.backoff import Backoff
from hub.errors import (
    AuthenticationFailed,
    ClientError,
    CloseCode,
    ConnectionLost,
    ErrorCode,
    SubscriptionRefused,
)
from hub.events import Event

__all__ = ["AuthenticationFailed", "ClientError", "ConnectionLost", "Notice", "NoticeKind",
           "SubscriptionRefused", "TokenSource", "subscribe", "token_file"]

log = logging.getLogger("hub.client")

WS_PATH = "/ws/events"
# Errors from the hub that retrying cannot fix: the subscription itself is wrong.
_FATAL_ERRORS = frozenset({ErrorCode.UNKNOWN_EVENT_TYPE, ErrorCode.INVALID_EVENT_TYPES,
                           ErrorCode.TOO_MANY_EVENT_TYPES, ErrorCode.INVALID_LAST_EVENT_ID,
                           ErrorCode.INVALID_FILTER, ErrorCode.INVALID_CONSUMER,
                           ErrorCode.TOO_MANY_CONSUMERS, ErrorCode.CONSUMER_CONFLICT})
# A consumer's acks go out at most this often (each one covers every event before it):
# well under the hub's message rate limit, however fast events are handled.
ACK_INTERVAL_S = 0.1


class NoticeKind(enum.Enum):
    CONNECTED = "connected"  # data: instance_id, connection_id, user_id
    DISCONNECTED = "disconnected"  # data: code, reason, retry_in, attempt
    RESUMED = "resumed"  # data: replayed, last_event_id, truncated
    HISTORY_TRUNCATED = "history_truncated"  # data: last_event_id, first_retained_id
    ERROR = "error"  # a non-fatal error message from the hub; data: code, message
    TOKEN_REFRESHED = "token_refreshed"  # data: user_id, exp


@dataclass(frozen=True, slots=True)
class Notice:
    """Something about the connection (not an event) a caller may want to show."""

    kind: NoticeKind
    message: str
    data: dict[str, Any] = field(default_factory=dict)


# A token, or where to get the current one (called at each connect and each refresh).
TokenSource = str | Callable[[], str | Awaitable[str]]


def token_file(path: str | Path) -> Callable[[], str]:
    """A token source that re-reads ``path`` each time (a file a sidecar keeps fresh)."""
    file = Path(path).expanduser()

    def read() -> str:
        return file.read_text().strip()
    return read


async def current_token(source: TokenSource) -> str:
    """The token ``source`` holds now."""
    if isinstance(source, str):
        return source
    value = source()
    if inspect.isawaitable(value):
        value = await value
    return str(value).strip()


def events_url(url: str) -> str:
    """``http://host:port`` (or ``ws://…``, with or without the path) → the
    ``ws(s)://host:port/ws/events`` URL. A path other than ``/`` or ``/ws/events`` is kept
    as the prefix the hub is mounted under."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a hub URL: {url!r} (expected http://host:port)")
    path = parts.path.rstrip("/")
    if not path.endswith(WS_PATH):
        path += WS_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class Subscription:
    """The async iterator :func:`subscribe` returns. ``last_event_id`` is the id of the
    last event yielded (the resume point), ``instance_id`` the instance serving it now."""

    def __init__(self, url: str, token: TokenSource, *, types: Iterable[str] | None = None,
                 last_event_id: str | None = None, retry_for: float | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 on_notice: Callable[[Notice], None] | None = None,
                 open_timeout: float = 10.0, consumer: str | None = None,
                 filter: Mapping[str, Any] | None = None,
                 ack_interval: float = ACK_INTERVAL_S) -> None:
        self.url = events_url(url)
        self.types = list(types) if types is not None else None
        self.last_event_id = last_event_id
        self.consumer = consumer
        self.filter = dict(filter) if filter is not None else None
        # A consumer's acks: the newest handled id not sent yet, when the last went out,
        # and the task that sends a pending one once the interval has passed.
        self._ack_interval = ack_interval
        self._unacked: str | None = None
        self._acked_at = 0.0
        self._ack_task: asyncio.Task[None] | None = None
        self.instance_id: str | None = None
        self._token = token
        self._retry_for = retry_for
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap)
        self._on_notice = on_notice
        self._open_timeout = open_timeout
        # Ids yielded lately: a guard against a duplicate at the seam of replay and live.
        self._recent: deque[str] = deque(maxlen=1024)
        self._ws: ClientConnection | None = None
        self._gen: AsyncGenerator[Event, None] | None = None
        self._closed = False
        # The token_expiring notice being answered, and a refresh retried after one that
        # did not extend the token.
        self._expiring: dict[str, Any] | None = None
        self._retry: asyncio.Task[None] | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    async def aclose(self) -> None:
        """Stop: close the connection; the iterator ends."""
        self._closed = True
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._send_ack(self._ws)  # what was handled, before going
            await self._ws.close()
        # From inside the consumer's loop the generator is suspended and can be closed now;
        # from another task it is running, and ends by itself once the socket has closed.
        if self._gen is not None and not getattr(self._gen, "ag_running", True):
            await self._gen.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _notice(self, kind: NoticeKind, message: str, data: Mapping[str, Any] | None = None,
                **extra: Any) -> None:
        # ``data`` is the hub's message as it came (it may hold "message" or "code" keys of
        # its own, so it is never spread into keyword arguments).
        log.info("%s", message)
        if self._on_notice is not None:
            self._on_notice(Notice(kind, message, {**(data or {}), **extra}))

    async def _run(self) -> AsyncGenerator[Event, None]:
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        while not self._closed:
            code: int | None = None
            reason = ""
            try:
                token = await current_token(self._token)
                async with websockets.connect(
                    self.url, additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=self._open_timeout, max_size=2**22,
                ) as ws:
                    self._ws = ws
                    async for event in self._session(ws):
                        down_since = None
                        yield event
                    if self._closed:
                        return
                    code, reason = ws.close_code, ws.close_reason or ""
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
            except InvalidURI as exc:
                raise ValueError(str(exc)) from None
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise AuthenticationFailed(f"HTTP {status}") from None
                reason = f"HTTP {status} from {self.url}"
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                # (OSError includes a token file that cannot be read now: retried.)
                reason = str(exc) or type(exc).__name__
            finally:
                self._ws = None
                self._expiring = None
                # Acks belong to a connection (the hub takes only ids it sent on it); what
                # was handled but not acknowledged comes again and is acknowledged then.
                self._unacked = None
                if self._ack_task is not None:
                    self._ack_task.cancel()
                    self._ack_task = None
                if self._retry is not None:
                    self._retry.cancel()
                    self._retry = None
            if self._closed:
                return
            if code == CloseCode.UNAUTHORIZED and not (
                    reason == "token expired" and not isinstance(self._token, str)):
                # (An expiry with a token source: the source may hold a newer token now, so
                # reconnect and resume; a source whose token is refused raises then.)
                raise AuthenticationFailed(reason)
            if code == CloseCode.GOING_AWAY:
                # A deploy or a restart: another instance (or this one, back) will serve us.
                self._backoff.reset()
            now = loop.time()
            down_since = now if down_since is None else down_since
            delay = self._backoff.next_delay()
            if self._retry_for is not None and now + delay - down_since > self._retry_for:
                raise ConnectionLost(
                    f"lost the connection to {self.url} ({_describe(code, reason)}) and could "
                    f"not reconnect within {self._retry_for:g}s")
            self._notice(NoticeKind.DISCONNECTED,
                         f"connection lost ({_describe(code, reason)}); reconnecting in "
                         f"{delay:.1f}s", code=code, reason=reason, retry_in=delay,
                         attempt=self._backoff.attempt)
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection) -> AsyncGenerator[Event, None]:
        """One connection: handshake, (re)subscribe, then yield events until it closes."""
        async for raw in ws:
            message = orjson.loads(raw)
            if not isinstance(message, dict):
                continue
            kind = message.get("type")
            data = message.get("data")
            data = data if isinstance(data, dict) else {}
            if "id" in message:
                event = Event(id=str(message["id"]), type=str(kind),
                              timestamp=str(message.get("timestamp", "")), data=data)
                if event.id in self._recent:
                    if self.consumer is not None:
                        await self._handled(ws, event.id)  # handled before a reconnect
                    continue
                self._recent.append(event.id)
                self.last_event_id = event.id
                yield event
                # Back here: the caller asked for the next event, so it has handled this
                # one (an exception or a crash in its code never gets here: re-delivered).
                if self.consumer is not None:
                    await self._handled(ws, event.id)
            elif kind == "connection_established":
                self._backoff.reset()
                self.instance_id = data.get("instance_id")
                self._notice(NoticeKind.CONNECTED, f"connected to {self.url} (instance "
                             f"{self.instance_id})", data)
                await self._subscribe(ws, data.get("event_types") or [])
            elif kind == "subscription_updated" and data.get("unknown_event_types"):
                # Not fatal: the known types apply, and the hub delivers the others once
                # events of those types appear (the proxy publishes types of its own).
                unknown = ", ".join(map(str, data["unknown_event_types"]))
                self._notice(NoticeKind.ERROR, f"the hub knows no event type {unknown} (yet);"
                             " subscribed to the others", data, code=ErrorCode.UNKNOWN_EVENT_TYPE)
            elif kind == "resumed":
                replayed = data.get("replayed", 0)
                self._notice(NoticeKind.RESUMED, f"resumed after {data.get('last_event_id')}: "
                             f"caught up {replayed} event(s)", data)
            elif kind == "history_truncated":
                self._notice(NoticeKind.HISTORY_TRUNCATED,
                             "some events were missed: the hub no longer retains events after "
                             f"{data.get('last_event_id')} (replay starts at "
                             f"{data.get('first_retained_id')})", data)
            elif kind == "token_expiring":
                self._expiring = data
                await self._refresh(ws, data)
            elif kind == "token_refreshed":
                expiring, self._expiring = self._expiring, None
                old, new = (expiring or {}).get("exp"), data.get("exp")
                if (isinstance(old, int | float) and isinstance(new, int | float)
                        and new <= old):
                    # The source holds no newer token yet (a file not renewed): ask it
                    # again shortly, until the old one expires.
                    self._retry_refresh(ws, expiring or {})
                    continue
                self._notice(NoticeKind.TOKEN_REFRESHED,
                             f"token refreshed (expires at {data.get('exp')})", data)
            elif kind == "error":
                code = str(data.get("code", ""))
                text = str(data.get("message", ""))
                if code in _FATAL_ERRORS:
                    raise SubscriptionRefused(text, code=code)
                if code == ErrorCode.CONSUMER_UNAVAILABLE:
                    # Not bound to the consumer: without its cursor, events would be
                    # taken from the wrong place. Reconnect (with backoff) and bind again.
                    self._notice(NoticeKind.ERROR, f"hub error {code}: {text}; reconnecting",
                                 data)
                    await ws.close()
                    return
                self._notice(NoticeKind.ERROR, f"hub error {code}: {text}", data)

    def _retry_refresh(self, ws: ClientConnection, notice: dict[str, Any]) -> None:
        exp = notice.get("exp")
        left = (exp - time.time()) if isinstance(exp, int | float) else 0.0
        if left <= 0:
            return

        async def again() -> None:
            await asyncio.sleep(min(0.5, left / 2))
            self._expiring = notice
            with contextlib.suppress(ConnectionClosed):
                await self._refresh(ws, notice)
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().create_task(again())

    async def _refresh(self, ws: ClientConnection, data: dict[str, Any]) -> None:
        """The hub says the token expires soon: send the source's current token."""
        if isinstance(self._token, str):
            self._notice(NoticeKind.ERROR, "the token expires soon and this client has no "
                         "token source to refresh from", data, code=ErrorCode.TOKEN_EXPIRED)
            return
        try:
            token = await current_token(self._token)
        except Exception as exc:  # a source that fails now may work at the next notice
            self._notice(NoticeKind.ERROR, f"could not get a new token: {exc}",
                         code=ErrorCode.MISSING_TOKEN)
            return
        await ws.send(orjson.dumps({"action": "refresh", "token": token}).decode())

    async def _handled(self, ws: ClientConnection, event_id: str) -> None:
        """The caller has handled ``event_id``: acknowledge it now, or with the next ack
        within the interval (an ack covers every event before it)."""
        self._unacked = event_id
        wait = self._acked_at + self._ack_interval - time.monotonic()
        if wait <= 0:
            await self._send_ack(ws)
        elif self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.get_running_loop().create_task(self._ack_later(ws, wait))

    async def _ack_later(self, ws: ClientConnection, wait: float) -> None:
        await asyncio.sleep(wait)
        with contextlib.suppress(ConnectionClosed):
            await self._send_ack(ws)

    async def _send_ack(self, ws: ClientConnection) -> None:
        event_id, self._unacked = self._unacked, None
        if event_id is None:
            return
        self._acked_at = time.monotonic()
        await ws.send(orjson.dumps({"action": "ack", "id": event_id}).decode())

    async def _subscribe(self, ws: ClientConnection, all_types: list[str]) -> None:
        if (self.types is None and self.last_event_id is None and self.consumer is None
                and self.filter is None):
            return  # no subscribe message: the spec's default, every type
        message: dict[str, Any] = {
            "action": "subscribe",
            "event_types": self.types if self.types is not None else all_types,
        }
        if self.last_event_id is not None:
            # (For a consumer, only where a new one starts: the hub's cursor wins.)
            message["last_event_id"] = self.last_event_id
        if self.consumer is not None:
            message["consumer"] = self.consumer
        if self.filter is not None:
            message["filter"] = self.filter
        await ws.send(orjson.dumps(message).decode())


def subscribe(url: str, token: TokenSource, *, types: Iterable[str] | None = None,
              last_event_id: str | None = None, retry_for: float | None = None,
              on_notice: Callable[[Notice], None] | None = None,
              backoff_base: float = 0.5, backoff_cap: float = 30.0,
              consumer: str | None = None,
              filter: Mapping[str, Any] | None = None) -> Subscription:
    """Stream events from the hub at ``url`` (``http://host:port``), for ever.

    ``types``: the event types to receive (default: all). ``last_event_id``: start with
    the retained events after this id. ``retry_for``: give up with
    :class:`ConnectionLost` after this many seconds without a connection (default: never).
    ``on_notice`` is called with a :class:`Notice` on connect, disconnect, resume and
    truncated history and refresh. Raises :class:`AuthenticationFailed` when the token is
    refused. ``token`` may be a source (a callable, e.g. :func:`token_file`): then the
    client refreshes in-band when told ``token_expiring``.

    ``filter``: a server-side filter (``{"min_severity": "high", "provider": [...]}``).
    ``consumer``: a durable consumer's name: the hub keeps its cursor, and each event is
    acknowledged once the caller's code has handled it (when it asks for the next one;
    acks are sent at most every 0.1 s, each covering the events before it). After a
    crash of this process, a disconnect or a hub restart, the consumer gets every event
    after its last acknowledged one (at least once: the un-acknowledged tail may come
    again); ``last_event_id`` then only says where a new consumer starts.
    """
    return Subscription(url, token, types=types, last_event_id=last_event_id,
                        retry_for=retry_for, on_notice=on_notice,
                        backoff_base=backoff_base, backoff_cap=backoff_cap,
                        consumer=consumer, filter=filter)


def _describe(code: int | None, reason: str) -> str:
    if code is None:
        return reason or "no close frame"
    with contextlib.suppress(ValueError):
        name = CloseCode(code).name.lower().replace("_", " ")
        return f"{code} {reason or name}"
    return f"{code} {reason}".strip()
