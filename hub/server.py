"""Running hub under uvicorn with a graceful stop that loses nothing.

uvicorn, on SIGTERM, closes WebSockets with 1012 *before* the application's lifespan
shutdown runs, so a lifespan hook is too late to announce the stop or flush outboxes.
``HubServer`` drains the hub first: ``system_status: shutdown`` goes out, each outbox is
flushed and each client closed with 1001; then uvicorn's own shutdown proceeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any

import uvicorn

from hub.app import HubApp, create_app
from hub.config import Settings
from hub.tasks import TaskSet

log = logging.getLogger("hub")


class HubServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: HubApp) -> None:
        super().__init__(config)
        self.hub_app = app
        self._reloads = TaskSet("reload")
        self._sighup = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # SIGHUP: re-read key and origin files (hub.reload). Its default action would kill
        # the process; uvicorn leaves it alone. Only the main thread may install handlers.
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError,
                                 AttributeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True

    def _on_sighup(self) -> None:
        log.info("received SIGHUP, reloading keys and origins")
        self._reloads.spawn(self.hub_app.hub.reload("SIGHUP"))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._sighup:  # a stopping hub reloads nothing, and a SIGHUP must not kill it
            self._sighup = False
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for server in self.servers:
            server.close()  # stop accepting while the hub drains
        try:
            await self.hub_app.hub.drain()
        except Exception:  # the drain must never keep the process from exiting
            log.exception("error while draining the hub")
        await super().shutdown(sockets)


def uvicorn_config(app: Any, settings: Settings, host: str, port: int, log_level: str,
                   **extra: Any) -> uvicorn.Config:
    from hub._compat.uvicorn_protocols import hub_config
    from hub.logs import log_config

    # hub's log format (JSON with HUB_JSON_LOGS) and token scrubbing; workers pass their own.
    extra.setdefault("log_config", log_config(settings.json_logs, log_level))
    # httptools and websockets-sansio under hub's limits (hub._compat.uvicorn_protocols):
    # the sans-I/O protocol is the one hub writes pre-encoded frames to; compression off, as in
    # socket.io's default, since per-recipient deflate would undo encode-once.
    return hub_config(
        app, settings, host=host, port=port, log_level=log_level, lifespan="on",
        ws_max_size=settings.max_message_bytes, ws_per_message_deflate=False,
        ws_ping_interval=settings.ping_interval_s, ws_ping_timeout=settings.ping_timeout_s,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 5,
        # X-Forwarded-For/-Proto only from the configured proxies (uvicorn's own default
        # trusts 127.0.0.1, i.e. anyone when hub runs beside an untrusting proxy).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies), server_header=False, **extra,
    )


def run(settings: Settings, *, host: str, port: int, log_level: str = "info") -> None:
    """One process (``hub serve --workers N`` runs hub.workers instead, from the CLI)."""
    app = create_app(settings)
    server = HubServer(uvicorn_config(app, settings, host, port, log_level), app)
    server.run()
