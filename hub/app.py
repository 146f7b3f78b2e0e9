"""``create_app()``: builds one hub instance — dispatcher, transports, routes, lifespan.
Wiring only: the HTTP handlers are in hub.http, the transports in hub.transports.

All state lives on the :class:`Hub` the factory creates; nothing is module-global, so two
instances run side by side in one process (the tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Any

import orjson
from redis import asyncio as aioredis
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from hub._version import __version__
from hub.auth import OriginPolicy, TokenVerifier
from hub.config import Settings
from hub.connection import Subscriber
from hub.consumers import Consumers, store_for
from hub.dispatch import Backend, Dispatcher
from hub.dispatch.memory import MemoryBackend
from hub.errors import BackendUnavailable, CloseCode, ErrorCode
from hub.events import SYSTEM_STATUS, Event, EventTypes
from hub.http import HttpApi, SecurityHeaders, dashboard_redirect
from hub.idempotency import IdempotencyKeys
from hub.keys import JwksKeys
from hub.limits import ConnectionLimits
from hub.metrics import Metrics
from hub.refusals import RefusalTracker
from hub.registry import ConnectionRegistry
from hub.reload import Reloader, ReloadResult
from hub.revocations import Revocation, Revocations
from hub.transports.frames import COALESCER_KEY, SEND_KEY, WriteCoalescer
from hub.transports.sio_manager import close_manager, manager_for
from hub.transports.socketio import SocketIOTransport
from hub.transports.sse import SseTransport
from hub.transports.websocket import PlainTransport

log = logging.getLogger("hub")


class Hub:
    """One hub instance: what the routes, the transports and the lifespan share."""

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.jwks = JwksKeys(
            settings.jwt_jwks_url, min_refetch_s=settings.jwks_min_refetch_s,
            refresh_s=settings.jwks_refresh_s, timeout_s=settings.jwks_timeout_s,
            on_fetch=lambda result: self.metrics.jwks_fetches.labels(result).inc(),
        ) if settings.jwt_jwks_url else None
        # verifier and origins are replaced as a whole by a reload (hub.reload): read them
        # from the hub at each use, never keep them.
        self.verifier = TokenVerifier(settings, self.jwks)
        # One Origin check for every transport (hub.auth.OriginPolicy).
        self.origins = OriginPolicy(settings.origins, settings.trusted_proxies)
        self.reloader = Reloader(
            self, lambda result: self.metrics.config_reloads.labels(result).inc())
        self.limits = ConnectionLimits(settings.max_connections, settings.max_connections_per_user)
        self.refusals = RefusalTracker(settings.refusal_limit, settings.refusal_window_s)
        self.types = EventTypes(settings.extra_event_types,
                                open_types=not settings.legacy_strict,
                                max_types=settings.max_event_types)
        self.coalescer = WriteCoalescer()
        self.dispatcher = Dispatcher(
            self._backend(settings, redis), self.types, self.metrics,
            max_data_bytes=settings.max_data_bytes,
            max_subscribe_types=settings.max_subscribe_types,
            batch=self.coalescer.coalesced,
            legacy_strict=settings.legacy_strict,
            # Never more than the history retains: a replay from the window must not
            # outlive what a replay from the backend would find.
            replay_window=min(settings.replay_window, settings.history_size),
        )
        backend = self.dispatcher.backend
        # Durable consumers' cursors (hub.consumers): in Redis with the Redis backend.
        self.consumers = Consumers(settings, store_for(settings, getattr(backend, "redis", None)),
                                   self.dispatcher, self.metrics)
        self.idempotency = IdempotencyKeys(getattr(backend, "redis", None),
                                           settings.stream_key + ":idem:")
        self.websocket = PlainTransport(self)
        # python-socketio's manager, on the backend's Redis client when it has one.
        self.sio_manager = manager_for(getattr(backend, "redis", None),
                                       settings.socketio_channel)
        self.socketio = SocketIOTransport(self, self.sio_manager)
        self.sse = SseTransport(self)
        # Revocations (hub.revocations): checked by the verifier at connect, refresh and
        # publish; each one closes the matching connections of both transports.
        self.revocations = Revocations(settings, getattr(backend, "redis", None),
                                       self._revoked)
        self.verifier.revoked = self.revocations.check
        self.registry = ConnectionRegistry(
            settings, getattr(backend, "redis", None), self._all_connections,
            lambda conn: sorted(conn.types) if conn.types is not None else None)
        self.http = HttpApi(self)
        self.started_at: float | None = None
        self._drained = False

    def _backend(self, settings: Settings, redis: aioredis.Redis | None) -> Backend:
        if redis is None and settings.redis_url is None:
            return MemoryBackend(settings.retained_events)
        from hub.dispatch.redis import RedisBackend, journal_for, open_redis, wait_options

        if redis is None and (settings.redis_url or "").startswith("redis+cluster://"):
            return self._cluster_backend(settings, settings.redis_url or "")
        owns = redis is None
        client = redis if redis is not None else open_redis(
            settings.redis_url or "", settings.redis_max_connections)
        return RedisBackend(
            client, owns_client=owns, stream_key=settings.stream_key,
            history_size=settings.retained_events,
            legacy_channel=settings.legacy_channel,
            legacy_parser=self._parse_legacy,
            instance_id=settings.instance_id,
            journal=journal_for(settings, client),
            on_reconnect=self.metrics.redis_reconnects.inc,
            on_journal_full=self.metrics.journal_full.inc,
            on_legacy=lambda result: self.metrics.legacy.labels(result).inc(),
            history_concurrency=settings.history_concurrency,
            on_health=self._redis_health,
            on_malformed=self.metrics.malformed_entries.inc,
            # wait_replicas / wait_ms from the URL (none without one: a host's client).
            **wait_options(settings.redis_url or "redis://")[1],
        )

    def _cluster_backend(self, settings: Settings, url: str) -> Backend:
        """The event stream sharded over a Redis Cluster (hub.dispatch.cluster)."""
        from hub.dispatch.cluster import ShardedBackend, open_cluster

        return ShardedBackend.build(
            open_cluster(url, settings.redis_max_connections), settings, url,
            on_health=self._redis_health,
            legacy_parser=self._parse_legacy,
            on_reconnect=self.metrics.redis_reconnects.inc,
            on_journal_full=self.metrics.journal_full.inc,
            on_legacy=lambda result: self.metrics.legacy.labels(result).inc(),
            history_concurrency=settings.history_concurrency,
            on_malformed=self.metrics.malformed_entries.inc)

    def _all_connections(self) -> Iterator[Subscriber]:
        yield from self.websocket.connections
        yield from self.socketio.connections.values()
        yield from self.sse.connections

    def _revoked(self, revocation: Revocation) -> None:
        closed = (self.websocket.revoke(revocation.covers)
                  + self.socketio.revoke(revocation.covers)
                  + self.sse.revoke(revocation.covers))
        if closed:
            log.warning("closed %d connection(s) after the revocation of %s %s", closed,
                        revocation.kind.value, revocation.value)

    def _redis_health(self, values: dict[str, float]) -> None:
        self.metrics.reader_lag.set(values["reader_lag_s"])
        self.metrics.round_trip.set(values["round_trip_s"])
        self.metrics.journal_events.set(values["journal_events"])

    def _parse_legacy(self, raw: bytes) -> Any:
        return self.dispatcher.parse_legacy(raw)

    async def publish(self, type_: str, data: dict[str, Any]) -> Event:
        """Publish an event from inside the process; returns it stamped with its id."""
        return await self.dispatcher.publish(type_, data)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()  # an unreachable endpoint: start degraded (README)
        await self.dispatcher.start()
        await self.revocations.start()
        await self.registry.start()
        # python-socketio starts its Redis listener only at the first Socket.IO connection;
        # start it now, so external emitters reach this instance from the first client on.
        sio = self.socketio.sio
        if not sio.manager_initialized:
            sio.manager_initialized = True
            sio.manager.initialize()
        self.started_at = time.time()
        await self._announce("online", "instance started")
        log.info("hub %s started (backend %s, instance %s)", __version__,
                 self.dispatcher.backend.name, self.settings.instance_id)

    async def drain(self) -> None:
        """Graceful stop: announce it, flush and close every client. Idempotent."""
        if self._drained:
            return
        self._drained = True
        event = await self._announce("shutdown", "instance shutting down")
        if event is not None:
            await self.dispatcher.wait_delivered(event, timeout=2.0)
        self.dispatcher.release_holds()
        await asyncio.gather(self.websocket.shutdown(), self.socketio.shutdown(),
                             self.sse.shutdown())

    async def stop(self) -> None:
        await self.drain()
        # Acknowledged events still in the outage journal: give Redis the shutdown timeout
        # to take them (what is left stays on disk for the next instance, and is logged).
        backend_drain = getattr(self.dispatcher.backend, "drain", None)
        if backend_drain is not None:
            await backend_drain(self.settings.shutdown_timeout_s)
        await self.consumers.stop(self.settings.shutdown_timeout_s)
        await close_manager(self.sio_manager)
        await self.revocations.stop()
        await self.registry.stop()
        await self.dispatcher.stop()
        if self.jwks is not None:
            await self.jwks.stop()

    # -- live reload (hub.reload) -------------------------------------------------------
    async def reload(self, source: str = "api") -> ReloadResult:
        """Re-read key and origin files; new connections use them (SIGHUP, POST
        /admin/reload)."""
        return await self.reloader.reload(source)

    async def announce_config_change(self, changed: list[str]) -> None:
        try:
            await self.publish(SYSTEM_STATUS, {
                "status": "config_change", "instance_id": self.settings.instance_id,
                "version": __version__, "changed": changed,
                "message": "configuration reloaded: " + ", ".join(changed),
            })
        except BackendUnavailable as exc:
            log.warning("could not announce config_change: %s", exc)

    def config_problems(self) -> list[str]:
        """Reasons for a degraded health besides the backend's: JWKS, a failed reload."""
        problems = self.jwks.problems() if self.jwks is not None else []
        return problems + self.reloader.problems()

    async def _announce(self, status: str, message: str) -> Event | None:
        try:
            return await self.publish(SYSTEM_STATUS, {
                "status": status, "instance_id": self.settings.instance_id,
                "version": __version__, "message": message,
            })
        except BackendUnavailable as exc:
            log.warning("could not announce %s: %s", status, exc)
            return None

    def connection_counts(self) -> dict[str, int]:
        return {"websocket": len(self.websocket.connections),
                "socketio": len(self.socketio.connections),
                "sse": len(self.sse.connections)}


class HubApp(Starlette):
    """The ASGI app of one instance; ``app.hub`` is its :class:`Hub`."""

    hub: Hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path, root = scope["path"], scope.get("root_path", "")
            path = path[len(root):] if path.startswith(root) else path
            if path.startswith("/socket.io") and not self.hub.origins.allows_scope(scope):
                # The same check as /ws/events, before python-socketio sees the request.
                await self._refuse_origin(scope, send)
                return
            if path == "/events/stream" and scope["type"] == "http":
                # Straight to the endpoint, with the server's own send (see hub.transports.sse).
                await self.hub.sse.asgi(scope, receive, send)
                return
        if scope["type"] == "websocket":
            # Before any middleware wraps it: the server's own send, for direct frame
            # writes (hub.transports.frames).
            scope[SEND_KEY] = send
            scope[COALESCER_KEY] = self.hub.coalescer
            path, root = scope["path"], scope.get("root_path", "")
            path = path[len(root):] if path.startswith(root) else path
            if path == "/ws/events":
                # Straight to the endpoint: routing and exception middleware would stay on
                # the stack of every open connection for its whole life (~3 KB each).
                await self.hub.websocket.asgi(scope, receive, send)
                return
            if path.startswith("/socket.io/"):
                # The same for Socket.IO's WebSocket: what Mount("/socket.io") would do,
                # without its scope copy and the frames of routing (~4 KB each).
                scope["root_path"] = root + "/socket.io"
                await self.hub.socketio.asgi_app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _refuse_origin(self, scope: Scope, send: Send) -> None:
        self.hub.metrics.auth_failures.labels(ErrorCode.ORIGIN_NOT_ALLOWED).inc()
        if scope["type"] == "websocket":
            # A close before accept: the handshake is answered 403.
            await send({"type": "websocket.close", "code": CloseCode.UNAUTHORIZED})
            return
        body = orjson.dumps({"error": {"code": ErrorCode.ORIGIN_NOT_ALLOWED,
                                       "message": "origin not allowed"}})
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def lifespan_context_for_host(self) -> contextlib.AbstractAsyncContextManager[None]:
        """For a host application that mounts this app: run hub's start-up and shutdown
        inside the host's lifespan (Starlette does not run a mounted app's lifespan)."""
        return _lifespan(self.hub)


@contextlib.asynccontextmanager
async def _lifespan(hub: Hub) -> AsyncIterator[None]:
    await hub.start()
    try:
        yield
    finally:
        await hub.stop()


def create_app(settings: Settings | None = None, redis: aioredis.Redis | None = None) -> HubApp:
    """Build a hub instance. ``redis``: a client the host application already owns (it is
    used as is and not closed); otherwise ``settings.redis_url`` picks the backend."""
    settings = settings if settings is not None else Settings.from_env()
    hub = Hub(settings, redis)
    routes = [
        WebSocketRoute("/ws/events", hub.websocket.endpoint),
        Route("/ws/health", hub.http.health, methods=["GET"]),
        Route("/events", hub.http.publish, methods=["POST"]),
        Route("/events", hub.http.history, methods=["GET"]),
        Route("/metrics", hub.http.metrics, methods=["GET"]),
        Route("/openapi.json", hub.http.openapi, methods=["GET"]),
        Route("/admin/reload", hub.http.admin_reload, methods=["POST"]),
        Route("/admin/revocations", hub.http.revocations, methods=["GET", "POST"]),
        Route("/admin/connections", hub.http.connections, methods=["GET"]),
        Route("/consumers", hub.http.consumers, methods=["GET", "DELETE"]),
        Mount("/socket.io", app=hub.socketio.asgi_app),
    ]
    static = resources.files("hub") / "static" / "dashboard"
    if static.is_dir():
        routes.append(Route("/dashboard", dashboard_redirect, methods=["GET", "HEAD"]))
        routes.append(Mount("/dashboard", app=SecurityHeaders(
            StaticFiles(directory=str(static), html=True))))
    app = HubApp(routes=routes, lifespan=lambda _app: _lifespan(hub))
    app.hub = hub
    return app
