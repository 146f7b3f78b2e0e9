"""The ``hub`` command: ``serve``, ``token``, ``publish``, ``revoke`` (and ``tail``).

Bad input stops with one ``hub: error: …`` line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import orjson

from hub.config import Settings
from hub.errors import HubError

DEFAULT_URL = "http://127.0.0.1:8000"


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"hub: error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_ttl(value: str) -> int:
    """``3600``, ``90s``, ``30m``, ``1h``, ``7d`` → seconds."""
    match = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r} (use 90s, 30m, 1h, 7d)")
    number, unit = int(match.group(1)), match.group(2) or "s"
    seconds = number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds <= 0:
        raise argparse.ArgumentTypeError("duration must be positive")
    return seconds


def redact(url: str) -> str:
    """A Redis URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# -- serve ------------------------------------------------------------------------------
def parse_port(value: str) -> int:
    """A TCP port, 1 to 65535; anything else stops with one ``hub: error:`` line."""
    try:
        port = int(value)
    except ValueError:
        _fail(f"--port must be a number from 1 to 65535, got {value!r}")
    if not 1 <= port <= 65535:
        _fail(f"--port must be a number from 1 to 65535, got {port}")
    return port


def check_bind(host: str, port: int) -> None:
    """Fail with one line, before anything starts, when ``host:port`` cannot be listened
    on (in use, no permission, unknown host). uvicorn would report it only after the app's
    start-up, with a traceback-free but late exit 3."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        _fail(f"cannot listen on {host}:{port}: unknown host ({exc})")
    for family, kind, proto, _name, address in addresses:
        probe = socket.socket(family, kind, proto)
        try:
            # As uvicorn binds: SO_REUSEADDR still refuses a port another socket listens on.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        finally:
            probe.close()


def _serve(args: argparse.Namespace) -> None:
    args.port = parse_port(args.port)
    overrides: dict[str, Any] = {"redis_url": args.redis_url}
    if args.allowed_origins is not None:
        overrides["allowed_origins"] = tuple(
            o.strip() for o in args.allowed_origins.split(",") if o.strip())
    dev_secret = None
    if args.dev and not os.environ.get("JWT_SECRET") and not os.environ.get("JWT_PUBLIC_KEY"):
        # A fresh random secret per run: a throwaway key, never a default one.
        dev_secret = secrets.token_urlsafe(32)
        overrides["jwt_secret"] = dev_secret
    try:
        settings = Settings.from_env(**overrides)
    except HubError as exc:
        _fail(exc.message)
    if settings.redis_url:
        _check_redis(settings.redis_url)
    elif args.workers > 1:
        _fail("--workers needs REDIS_URL: with the memory backend each worker would be a "
              "separate hub that sees only its own events")
    check_bind(args.host, args.port)
    if args.dev:
        _print_dev_banner(settings, args.host, args.port, dev_secret)
    if args.workers > 1:
        from hub.workers import run_workers

        run_workers(settings, host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level)
        return
    from hub.server import run

    run(settings, host=args.host, port=args.port, log_level=args.log_level)


def _check_redis(url: str) -> None:
    """Fail start-up with one line when Redis (plain, TLS or via Sentinel) does not answer."""
    from redis.exceptions import RedisError

    from hub.dispatch.redis import open_redis

    async def ping() -> None:
        client = open_redis(url)
        try:
            await asyncio.wait_for(client.ping(), 5)
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except (RedisError, OSError, ValueError, TimeoutError) as exc:
        _fail(f"cannot reach Redis at {redact(url)}: {exc or type(exc).__name__}")


def _print_dev_banner(settings: Settings, host: str, port: int, dev_secret: str | None) -> None:
    from hub.auth import issue_token

    try:
        admin = issue_token(settings, sub="dev-admin", role="admin", ttl_s=12 * 3600)
        viewer = issue_token(settings, sub="dev-viewer", role="viewer", ttl_s=12 * 3600)
    except HubError as exc:
        _fail(exc.message)
    base = f"{host}:{port}"
    lines = [
        "",
        "hub — development mode" + (" (random JWT secret for this run only)" if dev_secret else ""),
        "",
    ]
    if dev_secret:
        lines += [f"  export JWT_SECRET={dev_secret}   # to mint more tokens with `hub token`", ""]
    lines += [
        f"  viewer token: {viewer}",
        f"  admin token:  {admin}",
        "",
        "  Listen on /ws/events (Python, the websockets library; one line, paste it whole):",
        "    python -c 'from websockets.sync.client import connect; "
        f"ws = connect(\"ws://{base}/ws/events\", additional_headers="
        f"{{\"Authorization\": \"Bearer {viewer}\"}}); [print(m, flush=True) for m in ws]'",
        "",
        "  Publish a test event:",
        f"    curl -X POST http://{base}/events -H 'Authorization: Bearer {admin}' \\",
        "      -H 'Content-Type: application/json' -d '{\"type\": \"threat_detected\", "
        "\"data\": {\"severity\": \"high\", \"attack_type\": \"prompt_injection\", "
        "\"confidence\": 0.92, \"action_taken\": \"blocked\"}}'",
        "",
        f"  Dashboard: http://{base}/dashboard   Health: http://{base}/ws/health",
        "",
    ]
    print("\n".join(lines), flush=True)


# -- token ------------------------------------------------------------------------------
def _token(args: argparse.Namespace) -> None:
    from hub.auth import issue_token

    try:
        settings = Settings.from_env()
        private_key = None
        if args.private_key:
            try:
                with open(args.private_key) as fh:
                    private_key = fh.read()
            except OSError as exc:
                _fail(f"cannot read --private-key: {exc.strerror}")
        token = issue_token(settings, sub=args.sub, role=args.role, tenant=args.tenant,
                            ttl_s=args.ttl, private_key=private_key)
    except HubError as exc:
        _fail(exc.message)
    print(token)


# -- publish ----------------------------------------------------------------------------
def _publish(args: argparse.Namespace) -> None:
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        _fail(f"--data is not valid JSON: {exc}")
    redis_url = os.environ.get("REDIS_URL")
    if redis_url and not args.url:
        result = asyncio.run(_publish_redis(redis_url, args.type, data))
    else:
        result = _publish_http(args.url or DEFAULT_URL, args.token, args.type, data)
    print(orjson.dumps(result).decode())
    if result.get("durable") is False:
        print("hub: accepted but not shared yet: Redis is unavailable, the event is held in "
              "the hub's outage journal and delivered to other instances when Redis returns",
              file=sys.stderr)


async def _publish_redis(redis_url: str, type_: str, data: Any) -> dict[str, Any]:
    from hub.publish import Publisher

    try:
        settings = Settings.from_env(need_key=False)
        async with Publisher.from_settings(settings, retry_for_s=5.0) as publisher:
            event = await publisher.publish(type_, data)
    except HubError as exc:
        fields = getattr(exc, "fields", ())
        _fail(f"{exc.message}" + (f" (fields: {', '.join(fields)})" if fields else ""))
    # Publisher returns only once Redis holds the event: always shared.
    return {"id": event.id, "type": event.type, "timestamp": event.timestamp,
            "durable": event.shared}


def _publish_http(url: str, token: str | None, type_: str, data: Any) -> dict[str, Any]:
    import httpx

    from hub.auth import issue_token

    source = "--token"
    if not token and os.environ.get("HUB_TOKEN"):
        token, source = os.environ["HUB_TOKEN"], "the HUB_TOKEN environment variable"
    if not token:
        try:
            settings = Settings.from_env()
            token = issue_token(settings, sub="hub-cli", role=settings.publisher_roles[0],
                                ttl_s=300)
            source = (f"minted here from {'JWT_SECRET' if settings.jwt_secret else 'the key'}"
                      f" with role {settings.publisher_roles[0]!r}")
        except HubError as exc:
            _fail(f"no token to publish with: pass --token or set HUB_TOKEN ({exc.message})")
    try:
        response = httpx.post(url.rstrip("/") + "/events", json={"type": type_, "data": data},
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the hub at {url}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 202:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        fields = error.get("fields") or ([error["field"]] if error.get("field") else [])
        detail = f" (fields: {', '.join(map(str, fields))})" if fields else ""
        if response.status_code in (401, 403):
            detail += f"; the token came from {source}"
        _fail(f"publish refused ({response.status_code}): {error.get('message', response.text)}"
              + detail, code=1)
    return dict(body)


# -- revoke -----------------------------------------------------------------------------
def _revoke(args: argparse.Namespace) -> None:
    import httpx

    from hub.auth import issue_token

    body: dict[str, str] = {}
    for flag, name in (("user", "user_id"), ("jti", "jti"), ("tenant", "tenant_id")):
        if getattr(args, flag):
            body[name] = getattr(args, flag)
    if args.reason:
        body["reason"] = args.reason
    token, source = args.token, "--token"
    if not token and os.environ.get("HUB_TOKEN"):
        token, source = os.environ["HUB_TOKEN"], "the HUB_TOKEN environment variable"
    if not token:
        try:
            settings = Settings.from_env()
            token = issue_token(settings, sub=args.by, role=settings.admin_roles[0], ttl_s=300)
            source = f"minted here with role {settings.admin_roles[0]!r}"
        except HubError as exc:
            _fail(f"no admin token: pass --token or set HUB_TOKEN ({exc.message})")
    url = (args.url or DEFAULT_URL).rstrip("/") + "/admin/revocations"
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"},
                              timeout=10)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the hub at {args.url or DEFAULT_URL}: {exc}")
    try:
        reply = response.json()
    except ValueError:
        reply = {}
    if response.status_code != 201:
        error = reply.get("error", {}) if isinstance(reply, dict) else {}
        detail = f"; the token came from {source}" if response.status_code in (401, 403) else ""
        _fail(f"revocation refused ({response.status_code}): "
              f"{error.get('message', response.text)}{detail}", code=1)
    print(orjson.dumps(reply).decode())


# -- entry point ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description="Real-time event hub.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the hub")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", default="8000", help="TCP port, 1 to 65535")
    serve.add_argument("--redis-url", help="Redis for several instances (env REDIS_URL); "
                                           "without it, one process serves from memory")
    serve.add_argument("--allowed-origins", help="comma-separated browser origins "
                                                 "(env HUB_ALLOWED_ORIGINS)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (needs Redis)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--dev", action="store_true",
                       help="development mode: random JWT secret if none is set, print tokens")
    serve.set_defaults(func=_serve)

    token = commands.add_parser("token", help="print a token signed with the configured key")
    token.add_argument("--sub", required=True, help="user id (the `sub` claim)")
    token.add_argument("--role", help="role claim, e.g. admin or viewer")
    token.add_argument("--tenant", help="tenant claim")
    token.add_argument("--ttl", type=parse_ttl, default=3600, help="lifetime: 90s, 30m, 1h, 7d")
    token.add_argument("--private-key", help="PEM private key file (RS256/ES256 deployments)")
    token.set_defaults(func=_token)

    publish = commands.add_parser("publish", help="publish one event")
    publish.add_argument("type", help="event type, e.g. threat_detected")
    publish.add_argument("--data", required=True, help="the event's data as a JSON object")
    publish.add_argument("--url", help=f"publish via POST /events of this hub (default "
                                       f"{DEFAULT_URL}, or Redis when REDIS_URL is set)")
    publish.add_argument("--token", help="bearer token (env HUB_TOKEN; else minted from "
                                         "JWT_SECRET)")
    publish.set_defaults(func=_publish)

    revoke = commands.add_parser(
        "revoke", help="revoke a user's, a token's or a tenant's tokens on every instance")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="user id: tokens issued until now are refused")
    which.add_argument("--jti", help="one token, by its jti claim")
    which.add_argument("--tenant", help="tenant id: its tokens issued until now are refused")
    revoke.add_argument("--reason", help="why (kept in the listing and the audit log)")
    revoke.add_argument("--url", help=f"the hub (default {DEFAULT_URL})")
    revoke.add_argument("--token", help="an admin bearer token (env HUB_TOKEN; else minted "
                                        "from JWT_SECRET with the first HUB_ADMIN_ROLES role)")
    revoke.add_argument("--by", default="hub-cli",
                        help="who asks, when the token is minted here (default hub-cli)")
    revoke.set_defaults(func=_revoke)

    from hub.tail import add_parser as add_tail

    add_tail(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
