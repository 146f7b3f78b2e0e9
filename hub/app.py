"""``create_app()``: builds one hub instance — dispatcher, transports, routes, lifespan.

All state lives on the :class:`Hub` the factory creates; nothing is module-global, so two
instances run side by side in one process (the tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import orjson
from redis import asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from hub import __version__
from hub.auth import AuthError, OriginPolicy, TokenVerifier, strip_bearer
from hub.config import Settings
from hub.dispatch import Backend, Dispatcher
from hub.dispatch.memory import MemoryBackend
from hub.events import SYSTEM_STATUS, Event, EventTypes
from hub.exceptions import BackendUnavailable, EventError
from hub.idempotency import MAX_KEY_LENGTH, IdempotencyKeys
from hub.limits import ConnectionLimits
from hub.metrics import Metrics
from hub.openapi import openapi_document
from hub.refusals import RefusalTracker
from hub.transports.frames import SEND_KEY, coalesced_writes
from hub.transports.socketio import SocketIOTransport
from hub.transports.websocket import PlainTransport

log = logging.getLogger("hub")


class Hub:
    """One hub instance: what the routes, the transports and the lifespan share."""

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.verifier = TokenVerifier(settings)
        # One Origin check for every transport (hub.auth.OriginPolicy).
        self.origins = OriginPolicy(settings.allowed_origins, settings.trusted_proxies)
        self.limits = ConnectionLimits(settings.max_connections, settings.max_connections_per_user)
        self.refusals = RefusalTracker(settings.refusal_limit, settings.refusal_window_s)
        self.types = EventTypes(settings.extra_event_types,
                                open_types=not settings.legacy_strict,
                                max_types=settings.max_event_types)
        self.dispatcher = Dispatcher(
            self._backend(settings, redis), self.types, self.metrics,
            max_data_bytes=settings.max_data_bytes,
            max_subscribe_types=settings.max_subscribe_types,
            batch=coalesced_writes,
            legacy_strict=settings.legacy_strict,
            # Never more than the history retains: a replay from the window must not
            # outlive what a replay from the backend would find.
            replay_window=min(settings.replay_window, settings.history_size),
        )
        backend = self.dispatcher.backend
        self.idempotency = IdempotencyKeys(getattr(backend, "redis", None),
                                           settings.stream_key + ":idem:")
        self.websocket = PlainTransport(self)
        self.socketio = SocketIOTransport(self, self.dispatcher.backend.socketio_manager())
        self.started_at: float | None = None
        self._drained = False

    def _backend(self, settings: Settings, redis: aioredis.Redis | None) -> Backend:
        if redis is None and settings.redis_url is None:
            return MemoryBackend(settings.history_size)
        from hub.dispatch.redis import RedisBackend, journal_for, open_redis

        owns = redis is None
        client = redis if redis is not None else open_redis(
            settings.redis_url or "", settings.redis_max_connections)
        return RedisBackend(
            client, owns_client=owns, stream_key=settings.stream_key,
            history_size=settings.history_size, socketio_channel=settings.socketio_channel,
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
        )

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
        await self.dispatcher.start()
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
        await asyncio.gather(self.websocket.shutdown(), self.socketio.shutdown())

    async def stop(self) -> None:
        await self.drain()
        # Acknowledged events still in the outage journal: give Redis the shutdown timeout
        # to take them (what is left stays on disk for the next instance, and is logged).
        backend_drain = getattr(self.dispatcher.backend, "drain", None)
        if backend_drain is not None:
            await backend_drain(self.settings.shutdown_timeout_s)
        await self.dispatcher.stop()

    async def _announce(self, status: str, message: str) -> Event | None:
        try:
            return await self.publish(SYSTEM_STATUS, {
                "status": status, "instance_id": self.settings.instance_id,
                "version": __version__, "message": message,
            })
        except BackendUnavailable as exc:
            log.warning("could not announce %s: %s", status, exc)
            return None

    # -- HTTP endpoints -----------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        backend = self.dispatcher.backend
        ws = len(self.websocket.connections)
        sio = len(self.socketio.connections)
        problems = backend.problems()
        if self.started_at is None:
            status, code = "unhealthy", 503
        elif not problems:
            status, code = "healthy", 200
        else:
            status, code = "degraded", 200
        return JSONResponse({
            "status": status,
            "reasons": problems,
            "active_connections": ws + sio,
            "redis_connected": backend.name == "redis" and backend.subscribed,
            "backend": backend.name,
            "instance_id": self.settings.instance_id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            "connections": {"websocket": ws, "socketio": sio},
        }, status_code=code)

    async def publish_endpoint(self, request: Request) -> JSONResponse:
        authorization = request.headers.get("authorization", "")
        try:
            if authorization[:7].lower() != "bearer ":
                # Cookies are not accepted here: a cookie-authenticated POST is open to CSRF.
                raise AuthError("a bearer token is required", code="missing_token")
            principal = self.verifier.verify(strip_bearer(authorization))
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.code).inc()
            return _error(401, exc.code, exc.message, headers={"WWW-Authenticate": "Bearer"})
        if not principal.can_publish:
            self.metrics.auth_failures.labels("forbidden").inc()
            return _error(403, "forbidden", "this token's role may not publish")
        idempotency_key = request.headers.get("idempotency-key")
        scoped = None
        if idempotency_key is not None:
            if not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
                return _error(400, "invalid_idempotency_key",
                              f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
            scoped = self.idempotency.scoped(principal.user_id, idempotency_key)
            earlier = await self.idempotency.recall(scoped)
            if earlier is not None:  # a retry of a request that was answered: same reply
                return JSONResponse({**earlier, "duplicate": True}, status_code=202)
        limit = self.settings.max_data_bytes + 4096  # data plus the envelope around it
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the limit, not after it
            body += chunk
            if len(body) > limit:
                return _error(413, "event_too_large", "request body too large")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "invalid_json", "body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(422, "invalid_event", "body must be a JSON object", field="")
        try:
            event = await self.dispatcher.publish(payload.get("type"), payload.get("data"))
        except EventError as exc:
            return _error(422, exc.code, exc.message, field=exc.field, fields=exc.fields)
        except BackendUnavailable as exc:
            return _error(503, exc.code, "the event backend is unavailable; retry later",
                          headers={"Retry-After": "1"})
        # durable: in Redis, shared with every instance. False: accepted into this
        # instance's fsynced outage journal and delivered here; shared when Redis returns.
        reply = {"id": event.id, "type": event.type, "timestamp": event.timestamp,
                 "durable": event.shared}
        if scoped is not None:
            await self.idempotency.remember(scoped, reply)
        return JSONResponse(reply, status_code=202)

    async def metrics_endpoint(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi_endpoint(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi_document(__version__, self.types.publishable))


# The dashboard runs only its own bundled script and stylesheet and talks only to the hub
# it came from: no inline script or style, no eval, no framing by another site.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                 "img-src 'self' data:; connect-src 'self'; font-src 'self'; "
                 "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DASHBOARD_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", DASHBOARD_CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


class SecurityHeaders:
    """Adds :data:`DASHBOARD_HEADERS` to every response of the wrapped ASGI app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message,
                           "headers": [*message.get("headers", ()), *DASHBOARD_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _dashboard_redirect(request: Request) -> Response:
    # A path, never an absolute URL built from the client's Host header (an open
    # redirect / cache-poisoning lever); the root path keeps it right when mounted.
    location = request.scope.get("root_path", "") + "/dashboard/"
    return Response(status_code=307, headers={"location": location,
                                              **{k.decode(): v.decode()
                                                 for k, v in DASHBOARD_HEADERS}})


def _error(status: int, code: str, message: str, *, field: str | None = None,
           fields: tuple[str, ...] = (), headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field  # the first; "fields" lists every field at fault
        error["fields"] = list(fields or (field,))
    return JSONResponse({"error": error}, status_code=status, headers=headers)


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
        if scope["type"] == "websocket":
            # Before any middleware wraps it: the server's own send, for direct frame
            # writes (hub.transports.frames).
            scope[SEND_KEY] = send
            path, root = scope["path"], scope.get("root_path", "")
            if (path[len(root):] if path.startswith(root) else path) == "/ws/events":
                # Straight to the endpoint: routing and exception middleware would stay on
                # the stack of every open connection for its whole life (~3 KB each).
                await self.hub.websocket.asgi(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _refuse_origin(self, scope: Scope, send: Send) -> None:
        self.hub.metrics.auth_failures.labels("origin_not_allowed").inc()
        if scope["type"] == "websocket":
            # A close before accept: the handshake is answered 403.
            await send({"type": "websocket.close", "code": 4003})
            return
        body = orjson.dumps({"error": {"code": "origin_not_allowed",
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
        Route("/ws/health", hub.health, methods=["GET"]),
        Route("/events", hub.publish_endpoint, methods=["POST"]),
        Route("/metrics", hub.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", hub.openapi_endpoint, methods=["GET"]),
        Mount("/socket.io", app=hub.socketio.asgi_app),
    ]
    static = resources.files("hub") / "static" / "dashboard"
    if static.is_dir():
        routes.append(Route("/dashboard", _dashboard_redirect, methods=["GET", "HEAD"]))
        routes.append(Mount("/dashboard", app=SecurityHeaders(
            StaticFiles(directory=str(static), html=True))))
    app = HubApp(routes=routes, lifespan=lambda _app: _lifespan(hub))
    app.hub = hub
    return app
