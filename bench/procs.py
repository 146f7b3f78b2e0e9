"""Processes the bench starts and watches: free ports, a private Redis, servers, /proc sampling."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A benchmark could not be set up (a server did not start, a tool is missing)."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A port for a server, from below the kernel's ephemeral range (32768-60999), which
    the load client's thousands of outgoing connections draw their local ports from: one
    of them could otherwise take a port between its pick and its server's bind."""
    while True:
        port = random.randint(10000, 32767)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree(pid: int) -> list[int]:
    """The process and its descendants (a server may fork workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _proc_files(pids: Sequence[int], name: str) -> Iterator[str]:
    """/proc/<pid>/<name> of every process in the given trees (gone ones skipped)."""
    for root in pids:
        for p in tree(root):
            try:
                with open(f"/proc/{p}/{name}") as f:
                    text = f.read()
            except OSError:
                continue
            yield text


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of the given process trees, in seconds (all threads included)."""
    total = 0
    for stat in _proc_files(pids, "stat"):
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    return sum(int(statm.split()[1]) * PAGE for statm in _proc_files(pids, "statm"))


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"nothing listening on {port} after {timeout}s")


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise BenchError(f"{url} did not answer in {timeout}s: {last}")


def wait_workers(url: str, proc: subprocess.Popen[bytes], workers: int,
                 timeout: float = 30.0) -> None:
    """Until ``workers`` distinct hub workers (``instance_id`` in health) have answered:
    health answers as soon as one worker serves, and clients opened before the others
    listen would all land on it. Each request is a new connection, so any worker may
    take it."""
    import json

    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before its workers served")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                seen.add(json.loads(r.read())["instance_id"])
        except (OSError, ValueError, KeyError):
            pass
        if len(seen) >= workers:
            return
        time.sleep(0.02)
    raise BenchError(f"only {len(seen)} of {workers} workers answered {url} in {timeout}s")


@dataclass
class Proc:
    """A child process with its log file; stop() ends it (TERM, then KILL)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    port: int = 0,
) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it; closed when we drop the Proc
    popen = subprocess.Popen(
        list(argv),
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    fh.close()
    return Proc(name, popen, log, port)


def start_redis(logdir: Path) -> Proc:
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server not found on PATH (apt-get install redis-server)")
    port = free_port()
    proc = spawn(
        "redis",
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "1000",
        ],
        logdir / "redis.log",
        port=port,
    )
    wait_port(port, proc.popen, 10)
    return proc


def _established_inodes(port: int) -> set[str]:
    """Socket inodes of the established TCP connections whose local port is ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def connections_per_process(roots: Sequence[int], port: int) -> dict[int, int]:
    """How many established connections to ``port`` each process of the trees holds.

    From the kernel's view (/proc/net/tcp and each process's fds), so it counts what every
    worker really accepted; processes holding none (a supervisor, a helper) are left out.
    """
    wanted = _established_inodes(port)
    counts: dict[int, int] = {}
    for root in roots:
        for p in tree(root):
            try:
                fds = os.listdir(f"/proc/{p}/fd")
            except OSError:
                continue
            n = 0
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in wanted:
                    n += 1
            if n:
                counts[p] = n
    return counts


def write_syscalls(pids: Sequence[int]) -> int:
    """write()/writev() calls of the process trees so far (syscw of /proc/<pid>/io).

    uvloop writes sockets with write/writev, so for a hub server this counts its socket
    writes: deliveries per write shows how much its write coalescing joined."""
    total = 0
    for io in _proc_files(pids, "io"):
        for line in io.splitlines():
            if line.startswith("syscw:"):
                total += int(line.split()[1])
    return total
