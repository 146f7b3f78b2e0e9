"""hub.tasks.TaskSet: fire-and-forget tasks stay referenced until done; failures are logged."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from hub.tasks import TaskSet


async def test_a_spawned_task_survives_collection_and_is_let_go_when_done() -> None:
    tasks = TaskSet("test")
    release = asyncio.Event()
    finished = []

    async def work() -> None:
        await release.wait()
        finished.append(True)

    spawned = weakref.ref(tasks.spawn(work()))  # the caller keeps no reference
    gc.collect()
    task = spawned()
    assert task is not None and len(tasks) == 1
    release.set()
    await task
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert finished == [True] and len(tasks) == 0


async def test_a_failing_task_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("close")

    async def fail() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="hub.tasks"):
        task = tasks.spawn(fail())
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert len(tasks) == 0
    assert [r.getMessage() for r in caplog.records] == ["close task failed"]
