"""``hub serve --workers N``: several hub processes on one machine, one listening socket.

The supervisor (the parent process) binds the port once and spawns N workers. Each
worker is a complete hub instance — its own ``create_app()``, event loop, Redis clients
and :class:`~hub.server.HubServer` — with its own instance id (``<instance_id>-w<n>``);
the workers share events through Redis exactly as instances on separate machines do.

Spreading the connections: each worker listens on its own socket bound to the same port
with ``SO_REUSEPORT``, and the kernel hashes each new connection to one of the listening
sockets, so every worker gets an even share whatever the scheduling. (With one shared
listening socket, every worker's event loop is woken for a new connection and whichever
runs first accepts everything queued — uvloop accepts until ``EAGAIN`` — so the spread
follows which worker happens to be idle; on this machine it ranged from 50/50 to 57/43 per
1,000 clients, and such sharing is known to pile onto few workers as the count grows.)
The supervisor's own socket is bound with ``SO_REUSEPORT`` too but never listens: it holds
the port (a replacement worker can always bind it again, and ``hub serve`` started twice on
one port is refused by the CLI's bind check, which does not set the option) and takes no
connections. The kernel lets only sockets of the same user join a port this way. What a
listener queued but had not accepted when its worker dies is reset (the kernel does not
hand it to the others); clients reconnect. Where ``SO_REUSEPORT`` is missing the workers
share the supervisor's socket as before.

Why not uvicorn's own ``--workers``: its children run a plain ``uvicorn.Server`` over an
import string, so they would neither drain (``HubServer``) nor get a per-worker instance
id. The supervision rules are uvicorn's, kept small:

- SIGTERM or SIGINT to the parent → SIGTERM to every worker; each drains (announces
  ``system_status: shutdown``, flushes its outboxes, closes clients with 1001); the parent
  waits for all of them (bounded by the shutdown timeout) and then exits. A second signal
  is forwarded as is (uvicorn force-exits on a second SIGINT).
- SIGHUP to the parent → SIGHUP to every worker: each re-reads its key and origin files
  (hub.reload) and announces ``config_change`` itself (so a client sees one per worker).
- A worker that dies is replaced, with capped backoff if it keeps dying young. One that
  fails during start-up (uvicorn's exit code 3: bad app, Redis refused) stops everything,
  since every replacement would fail the same way.

Metrics: a scrape reaches any worker, so every worker must report all of them. The
supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a directory (the one given in the
environment, else a private temporary one), wipes its stale files at start, and tells
prometheus_client when a worker dies (``mark_process_dead``), so the connection gauge
counts live workers only. See :mod:`hub.metrics`.

Socket.IO long-polling needs every request of a session to reach the process that holds
the session, which workers sharing one port cannot promise: with ``--workers N``
Socket.IO clients must use the WebSocket transport only (``transports: ["websocket"]``),
or run one worker per container behind a proxy with sticky sessions (``docker/``).
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType

from hub.config import Settings
from hub.logs import log_config

log = logging.getLogger("hub.workers")

STARTUP_FAILURE = 3  # uvicorn's exit code for "failed before serving"
REUSE_PORT = hasattr(socket, "SO_REUSEPORT")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop


@dataclass
class _Slot:
    """One worker position; its process is replaced when it dies."""

    index: int
    process: SpawnProcess | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)


def run_workers(settings: Settings, *, host: str, port: int, workers: int,
                log_level: str = "info") -> None:
    """Serve with ``workers`` processes until SIGTERM/SIGINT; exit non-zero on failure."""
    logging.config.dictConfig(log_config(settings.json_logs, log_level))
    code = Supervisor(settings, host=host, port=port, workers=workers,
                      log_level=log_level).run()
    if code:
        sys.exit(code)


class Supervisor:
    def __init__(self, settings: Settings, *, host: str, port: int, workers: int,
                 log_level: str) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.settings = settings
        self.host, self.port, self.log_level = host, port, log_level
        self.slots = [_Slot(index) for index in range(1, workers + 1)]
        self.stopping = False
        self.exit_code = 0
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._metrics_dir: Path | None = None
        self._own_metrics_dir = False

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> int:
        sock = bind_socket(self.host, self.port)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (*_STOP_SIGNALS,
                                                                          signal.SIGHUP)}
        self._prepare_metrics_dir()
        try:
            scheme_host = f"[{self.host}]" if ":" in self.host else self.host
            log.info("hub supervisor [%d] serving http://%s:%d with %d workers",
                     os.getpid(), scheme_host, self.port, len(self.slots))
            for slot in self.slots:
                self._start(slot, sock)
            while not self.stopping:
                self._wait_for_change()
                self._handle_signals()
                if not self.stopping:
                    self._reap_and_restart(sock)
            self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._cleanup_metrics_dir()
        log.info("hub supervisor [%d] stopped", os.getpid())
        return self.exit_code

    def _wait_for_change(self) -> None:
        """Block until a worker exits, a signal arrives or a delayed restart is due."""
        sentinels: list[int] = [self._wake_r]
        sentinels += [s.process.sentinel for s in self.slots if s.process is not None]
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        wait_any(sentinels, timeout)
        self._drain_wakeups()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread; a blocking wait() in progress would
        # be resumed (PEP 475), so wake it through the pipe.
        self._signals.append(sig)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 64)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                log.info("received SIGHUP, forwarding it to %d workers", len(self.slots))
                self._send_all(sig)
                continue
            if not self.stopping:
                log.info("received %s, draining %d workers", signal.Signals(sig).name,
                         len(self.slots))
                self.stopping = True
            else:
                self._send_all(sig)

    # -- workers ------------------------------------------------------------------------
    def _start(self, slot: _Slot, sock: socket.socket) -> None:
        process = _spawn.Process(
            target=worker_main, name=f"hub-worker-{slot.index}",
            args=(self.settings, slot.index, sock, self.host, self.port, self.log_level),
        )
        process.start()
        assert process.pid is not None
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
        slot.pids.append(process.pid)
        log.info("started worker %d [%d]", slot.index, process.pid)

    def _reap_and_restart(self, sock: socket.socket) -> None:
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.exitcode is not None:
                slot.process = None
                self._mark_dead(process)
                if process.exitcode == STARTUP_FAILURE:
                    log.error("worker %d [%s] failed to start; stopping", slot.index,
                              process.pid)
                    self.exit_code = STARTUP_FAILURE
                    self.stopping = True
                    return
                lived = now - slot.started_at
                slot.quick_deaths = slot.quick_deaths + 1 if lived < 10 else 0
                delay = min(10.0, 0.5 * 2 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0
                log.warning("worker %d [%s] exited with code %s; restarting in %.1fs",
                            slot.index, process.pid, process.exitcode, delay)
                slot.restart_at = now + delay
            if slot.process is None and slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot, sock)

    def _send_all(self, sig: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _shutdown(self) -> None:
        """SIGTERM every worker, wait for their drains, kill what outlives the deadline."""
        self._send_all(signal.SIGTERM)
        # A worker drains for at most shutdown_timeout_s, then uvicorn's graceful timeout
        # (shutdown_timeout_s + 5) runs; past both, something is stuck.
        deadline = time.monotonic() + 2 * self.settings.shutdown_timeout_s + 10
        running = [s.process for s in self.slots if s.process is not None]
        while running:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait_any([p.sentinel for p in running] + [self._wake_r], remaining)
            self._drain_wakeups()
            self._handle_signals()  # a second signal is forwarded to the workers
            running = [p for p in running if p.exitcode is None]
        for process in running:
            log.error("worker [%s] did not stop in time; killing it", process.pid)
            process.kill()
            process.join()
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join()
                self._mark_dead(slot.process)
                # uvicorn re-raises the stop signal after its drain: -SIGTERM is normal.
                if slot.process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                    log.warning("worker %d exited with code %s", slot.index,
                                slot.process.exitcode)
                slot.process = None

    # -- metrics directory --------------------------------------------------------------
    def _prepare_metrics_dir(self) -> None:
        given = os.environ.get(MULTIPROC_ENV)
        if given:
            path = Path(given)
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("*.db"):  # files of an earlier run would be summed in
                stale.unlink()
        else:
            path = Path(tempfile.mkdtemp(prefix="hub-metrics-"))
            self._own_metrics_dir = True
            # Spawned workers inherit the environment as it is when they start.
            os.environ[MULTIPROC_ENV] = str(path)
        self._metrics_dir = path

    def _mark_dead(self, process: SpawnProcess) -> None:
        if self._metrics_dir is not None and process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                process.pid, str(self._metrics_dir))

    def _cleanup_metrics_dir(self) -> None:
        if self._own_metrics_dir and self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if REUSE_PORT:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        print(f"hub: error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    sock.set_inheritable(True)
    return sock


def worker_socket(shared: socket.socket, host: str) -> socket.socket:
    """The socket a worker listens on: its own one on the supervisor's port (SO_REUSEPORT:
    the kernel spreads connections over the workers), else the shared one."""
    if not REUSE_PORT:
        return shared
    port = shared.getsockname()[1]  # the port bound, also when 0 was asked for
    own = socket.socket(shared.family, socket.SOCK_STREAM)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        own.bind((host, port))
    except OSError as exc:
        own.close()
        print(f"hub: error: worker cannot listen on {host}:{port}: {exc.strerror}",
              file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    shared.close()  # the supervisor keeps the port; this process does not need its copy
    return own


def worker_main(settings: Settings, index: int, sock: socket.socket, host: str, port: int,
                log_level: str) -> None:
    """Entry point of one worker process (spawned: it imports the app afresh)."""
    from hub.app import create_app
    from hub.server import HubServer, uvicorn_config

    # Until HubServer installs its reload handler, a forwarded SIGHUP must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = settings.replace(instance_id=f"{settings.instance_id}-w{index}")
    app = create_app(settings)
    config = uvicorn_config(app, settings, host, port, log_level,
                            log_config=log_config(settings.json_logs, log_level))
    server = HubServer(config, app)
    sock = worker_socket(sock, host)
    # uvicorn re-raises the SIGINT it drained for (Ctrl-C reaches the whole process group);
    # the drain is done by then, so it is a normal exit, not a crash.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)
