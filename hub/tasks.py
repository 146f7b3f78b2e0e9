"""Tasks started and not awaited, kept until they end.

The event loop keeps only weak references to tasks: one that nothing else refers to may be
garbage-collected before it finishes (the asyncio documentation's warning on
``create_task``). A :class:`TaskSet` holds each task it starts until the task is done, and
logs a failure nobody would otherwise see.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """The owner's fire-and-forget tasks (close a session, run a resume, reload keys)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s task failed", self.what, exc_info=exc)
