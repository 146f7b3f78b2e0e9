"""What an idle connection holds (issue 16, memory): structural properties, no byte counts.

The figures are in bench/ (``bench/run --scenario capacity``) and README "Performance";
these tests keep the structure that makes them: an idle connection of either transport
runs no task of its own besides the one uvicorn runs its ASGI application in (no writer,
no engine.io reader-per-read, writer or ping task), and its outbox holds no queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.conftest import RunningHub, make_token
from tests.helpers import THREAT, connected, wait_until
from tests.sio_helpers import SioClient

N = 4
# Where server-side code lives (the test's own clients run websockets' and
# python-socketio's client code in the same loop: not counted).
SERVER_CODE = ("/uvicorn/", "/hub/", "engineio/async_socket.py", "engineio/async_server.py",
               "socketio/async_server.py", "engineio/async_drivers/")


def server_tasks() -> Counter[str]:
    tasks: Counter[str] = Counter()
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        if code is None or "/tests/" in code.co_filename:
            continue
        if any(part in code.co_filename for part in SERVER_CODE):
            tasks[getattr(coro, "__qualname__", "?")] += 1
    return tasks


async def test_an_idle_plain_connection_runs_only_its_asgi_task(
        memory_hub: RunningHub) -> None:
    before = server_tasks()
    clients = [await connected(memory_hub.ws_url, make_token(f"u{i}")) for i in range(N)]
    connections = memory_hub.hub.websocket.connections
    await wait_until(lambda: len(connections) == N, what="the connections")
    for conn in connections:  # its first frames went out: nothing waits
        await wait_until(lambda c=conn: c.outbox.writer is None, what="no writer")
        assert conn.outbox.queued == 0 and conn.outbox._queue is None
    grown = server_tasks() - before
    assert grown == Counter({"WebSocketsSansIOProtocol.run_asgi": N}), grown
    for ws in clients:
        await ws.close()


async def test_an_idle_socketio_connection_runs_only_its_asgi_task(
        memory_hub: RunningHub) -> None:
    before = server_tasks()
    clients = []
    for i in range(N):
        client = SioClient()
        await client.connect(memory_hub.url, auth={"token": make_token(f"s{i}")})
        await client.next_other("connection_established")
        clients.append(client)
    await wait_until(lambda: len(memory_hub.hub.socketio.connections) == N,
                     what="the connections")

    def settled() -> bool:
        grown = server_tasks() - before
        # engine.io's one service task for the whole server (started by the first session)
        if grown.get("AsyncServer._service_task", 0) <= 1:
            grown.pop("AsyncServer._service_task", None)
        return grown == Counter({"WebSocketsSansIOProtocol.run_asgi": N})
    # The writers that sent the handshake packets finish, and nothing else stays.
    await wait_until(settled, what=f"only the ASGI tasks (have {server_tasks() - before})")
    # An event still reaches every one (a writer comes and goes as needed).
    published = await memory_hub.publish("threat_detected", THREAT)
    for client in clients:
        assert (await client.next_event())["id"] == published.id
    for client in clients:
        await client.close()



async def test_lean_inbox_and_queue_behave_as_the_asyncio_ones_they_replace() -> None:
    from hub._compat.lean import LeanFlag, LeanInbox, LeanQueue

    drained: list[bool] = []
    inbox = LeanInbox(lambda: drained.append(True))
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    cancelled = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    assert await reader == "a" and not drained
    assert await inbox.get() == "b" and drained == [True]
    assert inbox.empty() and inbox._items is None and not inbox._waiters  # nothing held

    queue = LeanQueue()
    queue.put_nowait(1)
    joined = asyncio.ensure_future(queue.join())
    await asyncio.sleep(0)
    assert queue.get_nowait() == 1 and not joined.done()
    queue.task_done()
    await asyncio.wait_for(joined, 5)
    try:
        queue.get_nowait()
        raise AssertionError("an empty queue gave an item")
    except asyncio.QueueEmpty:
        pass

    flag = LeanFlag(True)
    flag.clear()
    waiting = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    flag.set()
    assert await waiting is True and flag._waiters is None
