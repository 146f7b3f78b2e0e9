"""Small stand-ins for ``asyncio.Queue`` and ``asyncio.Event`` on every connection.

An ``asyncio.Queue`` is three deques, a dict and an Event (about 3.3 KB), an
``asyncio.Event`` a deque (about 0.9 KB); uvicorn's WebSocket protocol and engine.io's
socket each keep one per connection, idle or not. These keep only what is in use: no
container while nothing is queued, a list of waiters only while someone waits. Each
implements just what its library calls (tests/test_compat.py checks the libraries' use).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class LeanInbox:
    """What uvicorn's WebSocket protocol uses of the ``asyncio.Queue`` of messages for the
    application (``put_nowait``, ``get``, ``empty``, ``qsize``), without its cost on an idle
    connection: an ``asyncio.Queue`` is three deques and an Event (about 3 KB), this holds
    nothing but the future the application's pending ``receive`` waits on. ``drained`` runs
    when ``get`` takes the last message (uvicorn's ``receive`` resumes reading then)."""

    __slots__ = ("_drained", "_items", "_waiters")

    def __init__(self, drained: Callable[[], None] | None = None) -> None:
        self._items: deque[Any] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        self._drained = drained

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def items(self) -> list[Any]:
        """What is queued, oldest first (for tests and diagnostics)."""
        return list(self._items or ())

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter  # put_nowait wakes every reader; the first takes the item
            finally:
                if self._waiters is not None and waiter in self._waiters:
                    self._waiters.remove(waiter)
        items = self._items
        item = items.popleft()
        if not items:
            self._items = None  # an empty deque is ~600 bytes; most connections idle
            if self._drained is not None:
                self._drained()
        return item


class LeanFlag:
    """What uvicorn's protocol and hub's frame sink use of the ``asyncio.Event``
    ``writable`` (``is_set``, ``set``, ``clear``, ``wait``): waiters are a list made only
    while someone waits (under backpressure), not a deque on every connection."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = True) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class LeanQueue(LeanInbox):
    """What python-engineio uses of a socket's ``asyncio.Queue`` (``put``,
    ``put_nowait``, ``get``, ``get_nowait``, ``task_done``, ``join``, ``qsize``,
    ``empty``), with the same ``task_done``/``join`` accounting."""

    __slots__ = ("_joiners", "_unfinished", "on_put")

    def __init__(self) -> None:
        super().__init__()
        self._unfinished = 0
        self._joiners: list[asyncio.Future[None]] | None = None
        # Called after each put (hub's engine.io socket starts its writer there).
        self.on_put: Callable[[], None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._unfinished += 1
        super().put_nowait(item)
        if self.on_put is not None:
            self.on_put()

    async def put(self, item: Any) -> None:
        self.put_nowait(item)  # unbounded, as engine.io's queue

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0:
            joiners, self._joiners = self._joiners, None
            for joiner in joiners or ():
                if not joiner.done():
                    joiner.set_result(None)

    async def join(self) -> None:
        if self._unfinished == 0:
            return
        joiner = asyncio.get_running_loop().create_future()
        if self._joiners is None:
            self._joiners = []
        self._joiners.append(joiner)
        try:
            await joiner
        finally:
            if self._joiners is not None and joiner in self._joiners:
                self._joiners.remove(joiner)
