"""Where an idle connection's bytes go: tracemalloc over N idle connections to one hub.

    python -m bench.memprofile --proto plain --clients 2000
    python -m bench.memprofile --proto sio --clients 2000 --top 25

Runs hub (memory backend, uvicorn under hub's config) in this process with tracemalloc on,
opens ``--clients`` idle connections with the bench's Node load client, and prints the
Python allocations the connections added, per connection: by owner (the library whose code
asked for the memory, found from the innermost frame that is not the standard library's
asyncio/collections machinery, so a Task that uvicorn creates counts as uvicorn's) and by
line. Only Python-heap bytes are seen; the kernel's socket buffers, and libuv/uvloop
handles allocated outside Python's allocator, are not (compare with the bench's RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from bench.procs import free_port

OWNERS = (
    ("/hub/", "hub"),
    ("/uvicorn/", "uvicorn"),
    ("/websockets/", "websockets"),
    ("/engineio/", "engine.io"),
    ("/socketio/", "socket.io"),
    ("/starlette/", "starlette"),
    ("/uvloop/", "uvloop"),
    ("/httptools/", "httptools"),
)
# Frames skipped when deciding whose an allocation is: the machinery a library calls.
PLUMBING = ("/asyncio/", "/collections/", "/enum.py", "/functools.py", "/typing.py",
            "/weakref.py", "/_weakrefset.py", "/contextvars", "<frozen", "/threading.py")


def owner(tb: tracemalloc.Traceback) -> tuple[str, str]:
    """(owner, 'file:line') of the innermost frame that is not plumbing."""
    frames = list(reversed(tb))  # a Traceback lists the oldest frame first
    for frame in frames:
        name = frame.filename
        if any(p in name for p in PLUMBING):
            continue
        for marker, who in OWNERS:
            if marker in name:
                return who, f"{name.split(marker, 1)[1]}:{frame.lineno}"
        return "other", f"{os.path.basename(name)}:{frame.lineno}"
    f = frames[0]
    return "stdlib", f"{os.path.basename(f.filename)}:{f.lineno}"


async def main(args: argparse.Namespace) -> None:
    import jwt

    from bench.targets import BENCH
    from hub.app import create_app
    from hub.config import Settings
    from hub.server import HubServer, uvicorn_config

    secret = secrets.token_urlsafe(32)
    port = free_port()
    settings = Settings.from_env({"JWT_SECRET": secret})
    app = create_app(settings)
    server = HubServer(uvicorn_config(app, settings, "127.0.0.1", port, "warning"), app)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.05)
    token = jwt.encode({"sub": "u", "role": "viewer", "exp": int(time.time()) + 86400}, secret,
                       algorithm="HS256")

    async def clients(n: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            "node", str(BENCH / "loadclient.js"), "--proto", args.proto, "--url",
            f"ws://127.0.0.1:{port}", "--clients", str(n), "--events", "1", "--token", token,
            "--run", "mem", "--batch", "64", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "BENCH_JWT_SECRET": secret},
            limit=1 << 20)
        assert proc.stdout is not None
        while b'"ready"' not in (line := await proc.stdout.readline()):
            if not line:
                raise SystemExit("load client exited")
        return proc

    warm = await clients(10)
    await asyncio.sleep(1)
    gc.collect()
    before = tracemalloc.take_snapshot()
    traced0 = tracemalloc.get_traced_memory()[0]
    t0 = time.monotonic()
    lc = await clients(args.clients)
    print(f"{args.clients} {args.proto} connections in {time.monotonic() - t0:.1f}s",
          file=sys.stderr)
    await asyncio.sleep(args.settle)
    gc.collect()
    after = tracemalloc.take_snapshot()
    traced1 = tracemalloc.get_traced_memory()[0]
    n = args.clients
    by_owner: Counter[str] = Counter()
    by_line: Counter[tuple[str, str]] = Counter()
    for stat in after.compare_to(before, "traceback"):
        who, where = owner(stat.traceback)
        by_owner[who] += stat.size_diff
        by_line[(who, where)] += stat.size_diff
    print(f"traced Python memory per connection: {(traced1 - traced0) / n / 1024:.2f} KiB")
    for who, size in by_owner.most_common():
        print(f"  {who:12s} {size / n:8.0f} B")
    print("top lines (bytes per connection):")
    for (who, where), size in by_line.most_common(args.top):
        print(f"  {size / n:8.0f}  {who:10s} {where}")
    for p in (lc, warm):
        assert p.stdin is not None
        try:
            p.stdin.write(b'{"cmd":"exit"}\n')
            await p.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        await p.wait()
    server.should_exit = True
    await serving


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memprofile", description=__doc__)
    p.add_argument("--proto", choices=("plain", "sio"), default="plain")
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--settle", type=float, default=2.0)
    args = p.parse_args(argv)
    tracemalloc.start(args.frames)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
