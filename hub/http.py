"""The HTTP endpoints of one instance: ``POST /events``, ``GET /ws/health``, ``/metrics``,
``/openapi.json`` and the dashboard's headers. Handlers only: hub.app wires them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from hub._version import __version__
from hub.auth import (
    AuthError,
    OriginPolicy,
    Principal,
    TokenVerifier,
    strip_bearer,
    token_from_headers,
)
from hub.config import Settings
from hub.consumers import Consumers, Owner, check_name
from hub.dispatch import Dispatcher
from hub.dispatch.filters import parse_types, split_params
from hub.dispatch.query import read_history
from hub.errors import BackendUnavailable, ErrorCode, EventError, ProtocolError
from hub.events import Event, EventTypes, is_event_id
from hub.idempotency import MAX_KEY_LENGTH, IdempotencyKeys
from hub.keys import JwksKeys
from hub.metrics import Metrics
from hub.openapi import openapi_document
from hub.registry import ConnectionRegistry
from hub.reload import Reloader, ReloadResult
from hub.revocations import MAX_VALUE_LENGTH, Kind, Revocations


class HttpServices(Protocol):
    """What the handlers use of their instance (hub.app.Hub provides it)."""

    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    origins: OriginPolicy
    dispatcher: Dispatcher
    idempotency: IdempotencyKeys
    types: EventTypes
    started_at: float | None
    revocations: Revocations
    registry: ConnectionRegistry
    consumers: Consumers

    def connection_counts(self) -> dict[str, int]: ...

    def config_problems(self) -> list[str]: ...

    @property
    def jwks(self) -> JwksKeys | None: ...

    @property
    def reloader(self) -> Reloader: ...

    async def reload(self, source: str = "api") -> ReloadResult: ...


class HttpApi:
    """The request handlers of one instance."""

    def __init__(self, services: HttpServices) -> None:
        self.services = services

    async def health(self, request: Request) -> JSONResponse:
        hub = self.services
        backend = hub.dispatcher.backend
        counts = hub.connection_counts()
        ws, sio, sse = counts["websocket"], counts["socketio"], counts.get("sse", 0)
        problems = backend.problems() + hub.config_problems()
        if hub.started_at is None:
            status, code = "unhealthy", 503
        elif not problems:
            status, code = "healthy", 200
        else:
            status, code = "degraded", 200
        return JSONResponse({
            "status": status,
            "reasons": problems,
            "active_connections": ws + sio + sse,
            "redis_connected": backend.name == "redis" and backend.subscribed,
            "backend": backend.name,
            "instance_id": hub.settings.instance_id,
            "version": __version__,
            "uptime_s": round(time.time() - hub.started_at, 3) if hub.started_at else 0.0,
            "connections": {"websocket": ws, "socketio": sio, "sse": sse},
            # JWT_JWKS_URL: the key set's state; null without it.
            "jwks": hub.jwks.status() if hub.jwks is not None else None,
            "reload": hub.reloader.status(),
        }, status_code=code)

    async def admin_reload(self, request: Request) -> JSONResponse:
        """``POST /admin/reload``: what SIGHUP does, for this instance (admin roles)."""
        hub = self.services
        principal = await self._bearer(request, lambda p: p.is_admin,
                                       "reloading needs an admin role")
        if isinstance(principal, JSONResponse):
            return principal
        result = await hub.reload(f"POST /admin/reload by {principal.user_id}")
        if not result.ok:
            return error_response(422, ErrorCode.RELOAD_FAILED,
                                  f"reload failed, the previous configuration stays in force: "
                                  f"{result.error}")
        return JSONResponse({"reloaded": True, "changed": result.changed,
                             "instance_id": hub.settings.instance_id})

    async def publish(self, request: Request) -> JSONResponse:
        hub = self.services
        principal = await self._bearer(request, lambda p: p.can_publish,
                                       "this token's role may not publish")
        if isinstance(principal, JSONResponse):
            return principal
        idempotency_key = request.headers.get("idempotency-key")
        scoped = None
        if idempotency_key is not None:
            if not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
                return error_response(400, ErrorCode.INVALID_IDEMPOTENCY_KEY,
                              f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
            scoped = hub.idempotency.scoped(principal.user_id, idempotency_key)
            earlier = await hub.idempotency.recall(scoped)
            if earlier is not None:  # a retry of a request that was answered: same reply
                return JSONResponse({**earlier, "duplicate": True}, status_code=202)
        # data plus the envelope around it
        body = await _bounded_body(request, hub.settings.max_data_bytes + 4096)
        if body is None:
            return error_response(413, ErrorCode.EVENT_TOO_LARGE, "request body too large")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_response(400, ErrorCode.INVALID_JSON, "body is not valid JSON")
        if not isinstance(payload, dict):
            return error_response(422, ErrorCode.INVALID_EVENT, "body must be a JSON object",
                                  field="")
        try:
            event = await hub.dispatcher.publish(payload.get("type"), payload.get("data"))
        except EventError as exc:
            return error_response(422, exc.code, exc.message, field=exc.field, fields=exc.fields)
        except BackendUnavailable as exc:
            return error_response(503, exc.code, "the event backend is unavailable; retry later",
                          headers={"Retry-After": "1"})
        # durable: in Redis, shared with every instance. False: accepted into this
        # instance's fsynced outage journal and delivered here; shared when Redis returns.
        reply = {"id": event.id, "type": event.type, "timestamp": event.timestamp,
                 "durable": event.shared}
        if scoped is not None:
            await hub.idempotency.remember(scoped, reply)
        return JSONResponse(reply, status_code=202)

    async def history(self, request: Request) -> JSONResponse:
        """``GET /events``: retained events, oldest first, with the selection a live
        connection of this token has (tenant, ``types``, the filter)."""
        hub = self.services
        refused = authenticate(hub, request.scope, request.headers)
        if isinstance(refused, JSONResponse):
            return refused
        principal = refused
        try:
            params, flt = split_params(request.query_params.multi_items(),
                                       ("after", "types", "limit"))
            after = params.get("after")
            if after is not None and not is_event_id(after):
                raise ProtocolError("after must be an event id like 1700000000000-0",
                                    code=ErrorCode.INVALID_LAST_EVENT_ID)
            limit = _limit(params.get("limit"))
            types = (set(hub.dispatcher.check_types(parse_types(params["types"])))
                     if "types" in params else None)
        except ProtocolError as exc:
            return error_response(400, exc.code, exc.message)

        def accept(event: Event) -> bool:
            return ((types is None or event.type in types)
                    and principal.may_see(event.tenant)
                    and (flt is None or flt.matches(event)))
        try:
            page = await read_history(hub.dispatcher.backend, after=after, limit=limit,
                                      accept=accept)
        except BackendUnavailable:
            return error_response(503, ErrorCode.HISTORY_UNAVAILABLE,
                                  "history is unavailable right now; retry later",
                                  headers={"Retry-After": "1"})
        return JSONResponse(page.body(), headers={"cache-control": "no-store"})

    async def _admin(self, request: Request) -> Principal | JSONResponse:
        """The admin principal of a request (bearer token with a role in HUB_ADMIN_ROLES),
        or the error response."""
        return await self._bearer(request, lambda p: p.is_admin,
                                  "this token's role is not in HUB_ADMIN_ROLES")

    async def _bearer(self, request: Request, may: Callable[[Principal], bool],
                      forbidden: str) -> Principal | JSONResponse:
        """The principal of a request's bearer token if ``may`` allows it, else the 401 or
        403 response. Cookies are never accepted here: a cookie-authenticated POST is open
        to CSRF."""
        hub = self.services
        authorization = request.headers.get("authorization", "")
        try:
            if authorization[:7].lower() != "bearer ":
                raise AuthError("a bearer token is required", code=ErrorCode.MISSING_TOKEN)
            principal = await hub.verifier.verify_async(strip_bearer(authorization))
        except AuthError as exc:
            hub.metrics.auth_failures.labels(exc.code).inc()
            return error_response(401, exc.code, exc.message,
                                  headers={"WWW-Authenticate": "Bearer"})
        if not may(principal):
            hub.metrics.auth_failures.labels(ErrorCode.FORBIDDEN).inc()
            return error_response(403, ErrorCode.FORBIDDEN, forbidden)
        return principal

    async def revocations(self, request: Request) -> JSONResponse:
        """``GET /admin/revocations`` lists them; ``POST`` with one of ``user_id``, ``jti``,
        ``tenant_id`` (and an optional ``reason``) revokes on every instance."""
        hub = self.services
        admin = await self._admin(request)
        if isinstance(admin, JSONResponse):
            return admin
        if request.method == "GET":
            return JSONResponse({"revocations": hub.revocations.listing()})
        payload = await _small_object(request)
        if isinstance(payload, JSONResponse):
            return payload
        named = [kind for kind in Kind if kind.value in payload]
        if len(named) != 1:
            return error_response(422, ErrorCode.INVALID_REVOCATION,
                                  "give exactly one of user_id, jti, tenant_id")
        kind = named[0]
        value = payload[kind.value]
        reason = payload.get("reason", "")
        if not isinstance(value, str) or not 0 < len(value) <= MAX_VALUE_LENGTH:
            return error_response(422, ErrorCode.INVALID_REVOCATION,
                                  f"{kind.value} must be a string of 1 to {MAX_VALUE_LENGTH} "
                                  "characters", field=kind.value)
        if not isinstance(reason, str) or len(reason) > MAX_VALUE_LENGTH:
            return error_response(422, ErrorCode.INVALID_REVOCATION,
                                  f"reason must be a string of at most {MAX_VALUE_LENGTH} "
                                  "characters", field="reason")
        try:
            revocation = await hub.revocations.revoke(kind, value, admin.user_id, reason)
        except (RedisError, OSError):  # Redis could not store it: nothing was revoked
            return error_response(503, ErrorCode.BACKEND_UNAVAILABLE,
                                  "the revocation could not be stored; retry later",
                                  headers={"Retry-After": "1"})
        return JSONResponse(revocation.as_dict(), status_code=201)

    async def connections(self, request: Request) -> JSONResponse:
        """``GET /admin/connections``: every instance's connections (hub/registry.py)."""
        admin = await self._admin(request)
        if isinstance(admin, JSONResponse):
            return admin
        return JSONResponse(await self.services.registry.listing())

    async def consumers(self, request: Request) -> JSONResponse:
        """``GET /consumers``: every durable consumer, its cursor and lag (hub/consumers.py);
        ``DELETE`` forgets one."""
        admin = await self._admin(request)
        if isinstance(admin, JSONResponse):
            return admin
        hub = self.services
        if request.method == "DELETE":
            return await self._delete_consumer(request)
        try:
            rows = await hub.consumers.listing(hub.registry.local_connections())
        except BackendUnavailable:
            return error_response(503, ErrorCode.CONSUMER_UNAVAILABLE,
                                  "the consumers' cursors cannot be read right now",
                                  headers={"Retry-After": "1"})
        settings = hub.settings
        return JSONResponse({"consumers": rows, "count": len(rows),
                             "max_lag": settings.consumer_lag_bound,
                             "max_per_user": settings.consumer_max_per_user,
                             "max_total": settings.consumer_max_total},
                            headers={"cache-control": "no-store"})

    async def _delete_consumer(self, request: Request) -> JSONResponse:
        """``DELETE /consumers`` with ``{user_id, tenant_id?, name}``: forget a consumer."""
        payload = await _small_object(request)
        if isinstance(payload, JSONResponse):
            return payload
        user, tenant = payload.get("user_id"), payload.get("tenant_id")
        if not isinstance(user, str) or not user or not (tenant is None
                                                          or isinstance(tenant, str)):
            return error_response(422, ErrorCode.INVALID_CONSUMER,
                                  "give user_id (and tenant_id, if the user has one)",
                                  field="user_id")
        try:
            name = check_name(payload.get("name"))
        except ProtocolError as exc:
            return error_response(422, exc.code, exc.message, field="name")
        try:
            deleted = await self.services.consumers.store.delete(Owner(user, tenant), name)
        except BackendUnavailable:
            return error_response(503, ErrorCode.CONSUMER_UNAVAILABLE,
                                  "the consumers' cursors cannot be changed right now",
                                  headers={"Retry-After": "1"})
        if not deleted:
            return error_response(404, ErrorCode.UNKNOWN_CONSUMER, "no such consumer")
        return JSONResponse({"deleted": True, "user_id": user, "tenant_id": tenant,
                             "name": name})

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        await self.services.consumers.update_metrics()
        return Response(self.services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi_document(__version__, self.services.types.publishable))



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


async def dashboard_redirect(request: Request) -> Response:
    # A path, never an absolute URL built from the client's Host header (an open
    # redirect / cache-poisoning lever); the root path keeps it right when mounted.
    location = request.scope.get("root_path", "") + "/dashboard/"
    return Response(status_code=307, headers={"location": location,
                                              **{k.decode(): v.decode()
                                                 for k, v in DASHBOARD_HEADERS}})


HISTORY_LIMIT_DEFAULT = 100
HISTORY_LIMIT_MAX = 1000


def _limit(value: str | None) -> int:
    if value is None:
        return HISTORY_LIMIT_DEFAULT
    if not value.isdigit() or not 1 <= int(value) <= HISTORY_LIMIT_MAX:
        raise ProtocolError(f"limit must be an integer from 1 to {HISTORY_LIMIT_MAX}",
                            code=ErrorCode.INVALID_PARAMETER)
    return int(value)


class _AuthServices(Protocol):
    metrics: Metrics
    verifier: TokenVerifier
    origins: OriginPolicy


def authenticate(hub: _AuthServices, scope: Scope, headers: Any) -> Principal | JSONResponse:
    """A GET endpoint's caller (``Authorization: Bearer`` or the ``ks_access_token``
    cookie, under the Origin rules of the WebSocket transports): its principal, or the
    401/403 answer. Read-only endpoints take the cookie (what EventSource sends)."""
    if not hub.origins.allows_scope(scope):
        hub.metrics.auth_failures.labels(ErrorCode.ORIGIN_NOT_ALLOWED).inc()
        return error_response(403, ErrorCode.ORIGIN_NOT_ALLOWED, "origin not allowed")
    try:
        return hub.verifier.verify(token_from_headers(headers))
    except AuthError as exc:
        hub.metrics.auth_failures.labels(exc.code).inc()
        return error_response(401, exc.code, exc.message,
                              headers={"WWW-Authenticate": "Bearer"})


def error_response(status: int, code: str, message: str, *, field: str | None = None,
           fields: tuple[str, ...] = (), headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field  # the first; "fields" lists every field at fault
        error["fields"] = list(fields or (field,))
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def _bounded_body(request: Request, limit: int) -> bytearray | None:
    """The request body, or None once it passes ``limit`` bytes (reading stops there, not
    at the end of whatever the client sends)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


async def _small_object(request: Request, limit: int = 4096) -> dict[str, Any] | JSONResponse:
    """The body of an admin request: a JSON object of at most ``limit`` bytes, or the
    error response saying why not."""
    body = await _bounded_body(request, limit)
    if body is None:
        return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, "request body too large")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return error_response(400, ErrorCode.INVALID_JSON, "body is not valid JSON")
    if not isinstance(payload, dict):
        return error_response(422, ErrorCode.NOT_AN_OBJECT, "body must be a JSON object")
    return payload
