"""Baseline peer: a plain python-socketio build, as a user would write it without hub.

``socketio.AsyncServer`` with ``AsyncRedisManager`` under uvicorn, doing hub's job: JWT
checked at connect from ``auth.token``, one room per event type, a ``subscribe`` /
``unsubscribe`` filter with hub's semantics. Native publish path: ``POST /publish``
``{type, data}`` stamps the envelope and calls ``sio.emit(type, envelope, room=type)``; the
Redis manager publishes it and every instance's listener delivers it to its local room.

Run: ``python -m bench.peers.pysio_baseline --port P --redis-url redis://...`` with
``JWT_SECRET`` in the environment.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import jwt
import socketio
import uvicorn

EVENT_TYPES = ("threat_detected", "provider_health_change", "cost_threshold_alert", "system_status")


def _valid_types(value: Any) -> list[str] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(t, str) and t in EVENT_TYPES for t in value):
        return None
    return value


def build_app(redis_url: str, secret: str) -> Any:
    mgr = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=mgr, cors_allowed_origins=[])
    instance_id = secrets.token_hex(4)
    counter = itertools.count()
    narrowed: set[str] = set()

    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            claims = jwt.decode(token or "", secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"code": 4003}
            ) from None
        await sio.save_session(sid, {"user": claims.get("sub")})
        types = _valid_types(auth.get("event_types")) or list(EVENT_TYPES)
        for t in types:
            await sio.enter_room(sid, t)

    async def disconnect(sid: str, *args: Any) -> None:
        narrowed.discard(sid)

    def _current(sid: str) -> list[str]:
        rooms = set(sio.rooms(sid))
        return [t for t in EVENT_TYPES if t in rooms]

    async def subscribe(sid: str, msg: Any) -> dict[str, Any]:
        types = _valid_types(msg.get("event_types") if isinstance(msg, dict) else None)
        if types is None:
            return {"error": {"code": "unknown_event_type", "message": "bad event_types"}}
        if sid not in narrowed:
            for t in EVENT_TYPES:
                if t not in types:
                    await sio.leave_room(sid, t)
            narrowed.add(sid)
        for t in types:
            await sio.enter_room(sid, t)
        return {"subscribed_to": _current(sid)}

    async def unsubscribe(sid: str, msg: Any) -> dict[str, Any]:
        types = _valid_types(msg.get("event_types") if isinstance(msg, dict) else None)
        if types is None:
            return {"error": {"code": "unknown_event_type", "message": "bad event_types"}}
        narrowed.add(sid)
        for t in types:
            await sio.leave_room(sid, t)
        return {"subscribed_to": _current(sid)}

    for handler in (connect, disconnect, subscribe, unsubscribe):
        sio.on(handler.__name__, handler)

    async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, body = 404, b""
        if scope["method"] == "GET" and scope["path"] == "/health":
            status, body = 200, json.dumps({"status": "healthy"}).encode()
        elif scope["method"] == "POST" and scope["path"] == "/publish":
            raw = b""
            more = True
            while more:
                message = await receive()
                raw += message.get("body", b"")
                more = message.get("more_body", False)
            try:
                req = json.loads(raw)
                etype = req["type"]
            except (ValueError, KeyError, TypeError):
                etype = None
            if etype not in EVENT_TYPES:
                status = 422
            else:
                envelope = {
                    "id": f"{int(time.time() * 1000)}-{instance_id}-{next(counter)}",
                    "type": etype,
                    "timestamp": datetime.now(UTC)
                    .isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
                    "data": req.get("data") or {},
                }
                await sio.emit(etype, envelope, room=etype)
                status, body = 202, json.dumps({"id": envelope["id"]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return socketio.ASGIApp(sio, other_asgi_app=http_app)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    )
    args = parser.parse_args()
    secret = os.environ.get("JWT_SECRET")
    if not secret:
        raise SystemExit("pysio_baseline: JWT_SECRET is required")
    app = build_app(args.redis_url, secret)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
