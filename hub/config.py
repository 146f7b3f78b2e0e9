"""Settings from the environment (and ``hub serve`` flags).

The JWT and Redis names are the ones the proxy already uses (``REDIS_URL``, ``JWT_*``), so
hub drops in beside it; hub's own settings carry the ``HUB_`` prefix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hub.errors import ConfigError

MIN_HS_SECRET_BYTES = 32
HS_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Settings:
    """Everything hub can be configured with. Build it with :meth:`from_env` or directly."""

    redis_url: str | None = None
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    jwt_algorithms: tuple[str, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: float = 0.0
    allowed_origins: tuple[str, ...] = ()
    history_size: int = 10_000
    outbox_limit: int = 1_000
    publisher_roles: tuple[str, ...] = ("admin",)
    admin_roles: tuple[str, ...] = ("admin",)
    role_claim: str = "role"
    tenant_claim: str = "tenant_id"
    legacy_channel: str = "koreshield:events"
    extra_event_types: tuple[str, ...] = ()
    # The proxy's channel: strict refuses spec types whose data misses hub's schema and
    # types not configured; by default both are delivered (see README "Drop-in for the proxy").
    legacy_strict: bool = False
    max_event_types: int = 64  # spec + extra + types learned from the channel or stream
    stream_key: str = "hub:events"
    socketio_channel: str = "socketio"
    instance_id: str = field(default_factory=_default_instance_id)
    max_message_bytes: int = 64 * 1024
    max_data_bytes: int = 64 * 1024
    max_subscribe_types: int = 64
    client_rate: float = 20.0
    client_burst: int = 50
    max_connections: int = 10_000
    max_connections_per_user: int = 100
    shutdown_timeout_s: float = 10.0
    # Refused /ws/events connections from one address answered with 4003 before it gets
    # HTTP 403 before the handshake, and the quiet time that ends it (hub/refusals.py).
    refusal_limit: int = 5
    refusal_window_s: float = 60.0
    # The outage journal (Redis backend): acknowledged events not in Redis yet. Empty: the
    # default, $XDG_STATE_HOME/hub/journal or ~/.local/state/hub/journal.
    journal_dir: str = ""
    journal_max_events: int = 100_000
    json_logs: bool = False
    # Keepalive for both transports: uvicorn's WebSocket pings on /ws/events (and Socket.IO
    # over WebSocket) and Engine.IO's pings, whose values clients learn in the handshake.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    # Engine.IO sessions that have not connected the Socket.IO namespace (authenticated)
    # yet: how many at once, how many per client address, and for how long.
    socketio_unbound_limit: int = 4096
    socketio_unbound_per_address: int = 1024
    socketio_connect_timeout_s: float = 10.0
    # A Socket.IO transport being closed (slow consumer, expiry, ping timeout) is aborted
    # after this long if its peer does not read the close.
    close_timeout_s: float = 5.0
    # Resumes: the recent events each instance keeps for replays without a Redis call; how
    # many history reads may use Redis at once (the rest queue); the Redis pool's size; how
    # long a new connection holds live events waiting for a subscribe that may resume.
    replay_window: int = 2_000
    history_concurrency: int = 8
    redis_max_connections: int = 100
    resume_hold_s: float = 1.0
    # Server-Sent Events (GET /events/stream): a comment line this often keeps proxies
    # and clients from timing the stream out; the retry: hint tells EventSource how long
    # to wait before it reconnects (milliseconds).
    sse_heartbeat_s: float = 15.0
    sse_retry_ms: int = 3_000
    # -- hardening (README "Security") ---------------------------------------------------
    # Request line plus headers, and how many headers: larger requests get 431 at once.
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    # Request bodies; 0: the largest body an endpoint accepts (POST /events, a polling POST).
    max_body_bytes: int = 0
    # A connection must deliver a complete request within this; else 408 and closed.
    handshake_timeout_s: float = 10.0
    # Connections that have not yet sent a complete request, on this instance and per
    # client address (configured proxies are exempt from the per-address cap).
    max_pending_connections: int = 1024
    max_pending_per_address: int = 256
    # Peers (addresses or CIDR networks; "*": any) whose X-Forwarded-* / Forwarded headers
    # are trusted.
    trusted_proxies: tuple[str, ...] = ()
    require_exp: bool = True
    max_token_lifetime_s: float = 7 * 24 * 3600
    # -- key rotation and live reload (README "Key rotation and live reload") -------------
    # JWT_SECRET_FILE: one HS secret per line, all accepted, the first signs `hub token`.
    # JWT_JWKS_URL: keys from an SSO provider's JWKS endpoint (hub.keys.JwksKeys).
    # HUB_ALLOWED_ORIGINS_FILE: one origin per line, added to HUB_ALLOWED_ORIGINS.
    # SIGHUP or POST /admin/reload re-reads the files (and JWT_PUBLIC_KEY as a path).
    jwt_secret_file: str | None = None
    jwt_jwks_url: str | None = None
    allowed_origins_file: str | None = None
    # A token naming an unknown `kid` refetches the JWKS at most once per this interval
    # (failed fetches included); the set is also refetched every jwks_refresh_s.
    jwks_min_refetch_s: float = 30.0
    jwks_refresh_s: float = 300.0
    jwks_timeout_s: float = 5.0
    # A token_expiring notice goes out this long before a connection's token expires, so
    # the client can refresh in-band ({"action": "refresh"}, README "Token refresh").
    token_expiring_lead_s: float = 30.0
    # How often each instance stores a snapshot of its connections in Redis for
    # GET /admin/connections (hub/registry.py).
    connections_registry_s: float = 5.0
    # -- durable consumers (README "Durable consumers") -----------------------------------
    # Retention keeps at least this many events (the larger of it and HUB_HISTORY_SIZE),
    # so a consumer this far behind its last ack loses nothing; further, it is told.
    # 0: HUB_HISTORY_SIZE (retention as without consumers).
    consumer_max_lag: int = 0
    consumer_max_per_user: int = 16
    consumer_max_total: int = 1_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, need_key: bool = True,
                 **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default: ``os.environ``); ``overrides`` win.

        ``need_key=False`` is for tools that only publish through Redis and never check a
        token (``hub publish`` with ``REDIS_URL``)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = _ENV_NAMES.get(f.name, "HUB_" + f.name.upper())
            raw = env.get(name)
            if raw is None or (raw == "" and f.name not in _EMPTY_ALLOWED):
                continue
            values[f.name] = _parse(f.name, name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = cls(**values)
        except TypeError as exc:  # an unknown override name is a programming error upstream
            raise ConfigError(str(exc)) from None
        settings.validate(need_key=need_key)
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    @property
    def consumer_lag_bound(self) -> int:
        """HUB_CONSUMER_MAX_LAG in effect: how far behind its last ack a consumer may fall
        and lose nothing."""
        return self.consumer_max_lag or self.history_size

    @property
    def retained_events(self) -> int:
        """How many events the history keeps: HUB_HISTORY_SIZE, or HUB_CONSUMER_MAX_LAG
        when larger (what a consumer has not acknowledged is kept up to that bound)."""
        return max(self.history_size, self.consumer_lag_bound)

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "memory"

    @property
    def body_limit(self) -> int:
        """The largest request body accepted at the HTTP layer."""
        if self.max_body_bytes:
            return self.max_body_bytes
        # POST /events takes data plus its envelope; a polling POST one message's worth.
        return max(self.max_data_bytes + 4096, self.max_message_bytes + 4096)

    @property
    def verify_key(self) -> str:
        """The key tokens are verified with (the secret for HS*, the public key otherwise)."""
        if self.jwt_public_key:
            return _read_key(self.jwt_public_key, "JWT_PUBLIC_KEY")
        assert self.jwt_secret is not None  # validate() guarantees one of the two
        return self.jwt_secret

    @property
    def algorithms(self) -> tuple[str, ...]:
        if self.jwt_algorithms:
            return self.jwt_algorithms
        return ("RS256", "ES256") if self.jwt_public_key or self.jwt_jwks_url else ("HS256",)

    @property
    def hs_secrets(self) -> tuple[str, ...]:
        """Every HS secret accepted: JWT_SECRET, or each line of JWT_SECRET_FILE (re-read
        at each call; the first signs)."""
        if self.jwt_secret:
            return (self.jwt_secret,)
        if not self.jwt_secret_file:
            return ()
        text = _read_file(self.jwt_secret_file, "JWT_SECRET_FILE")
        found = tuple(line.strip() for line in text.splitlines()
                      if line.strip() and not line.lstrip().startswith("#"))
        if not found:
            raise ConfigError("JWT_SECRET_FILE holds no secret (one per line)")
        for number, secret in enumerate(found, 1):
            if len(secret.encode()) < MIN_HS_SECRET_BYTES:
                raise ConfigError(f"JWT_SECRET_FILE secret {number} is too weak: "
                                  f"{len(secret.encode())} bytes, HS256 needs at least "
                                  f"{MIN_HS_SECRET_BYTES}")
        return found

    @property
    def signing_secret(self) -> str | None:
        """The HS secret ``hub token`` signs with (JWT_SECRET, or JWT_SECRET_FILE's first)."""
        secrets_ = self.hs_secrets
        return secrets_[0] if secrets_ else None

    @property
    def origins(self) -> tuple[str, ...]:
        """HUB_ALLOWED_ORIGINS plus the lines of HUB_ALLOWED_ORIGINS_FILE (re-read)."""
        found = list(self.allowed_origins)
        if self.allowed_origins_file:
            text = _read_file(self.allowed_origins_file, "HUB_ALLOWED_ORIGINS_FILE")
            for line in text.splitlines():
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                if entry != "*" and not urlsplit(entry).netloc:
                    raise ConfigError(f"HUB_ALLOWED_ORIGINS_FILE entry {entry!r} is not an "
                                      "origin like https://dash.example.com")
                found.append(entry)
        return tuple(found)

    def validate(self, *, need_key: bool = True) -> None:
        """Raise :class:`ConfigError` with one clear sentence for the first bad setting."""
        key_settings = [name for name, value in (
            ("JWT_SECRET", self.jwt_secret), ("JWT_SECRET_FILE", self.jwt_secret_file),
            ("JWT_PUBLIC_KEY", self.jwt_public_key), ("JWT_JWKS_URL", self.jwt_jwks_url))
            if value]
        if need_key and not key_settings:
            raise ConfigError(
                "no token key: set JWT_SECRET (HS256, at least 32 bytes), JWT_SECRET_FILE, "
                "JWT_PUBLIC_KEY (RS256/ES256) or JWT_JWKS_URL; for a throwaway local run use "
                "`hub serve --dev`"
            )
        if self.jwt_secret and self.jwt_public_key:
            raise ConfigError("set either JWT_SECRET or JWT_PUBLIC_KEY, not both")
        if len(key_settings) > 1:
            raise ConfigError(f"set only one of {', '.join(key_settings)}")
        if self.jwt_secret_file:
            _ = self.hs_secrets  # reads and checks the file
            if not set(self.algorithms) <= HS_ALGORITHMS:
                raise ConfigError("JWT_SECRET_FILE works only with HS256/HS384/HS512 in "
                                  "JWT_ALGORITHMS")
        if self.jwt_jwks_url:
            if urlsplit(self.jwt_jwks_url).scheme not in {"http", "https"}:
                raise ConfigError("JWT_JWKS_URL must be an http:// or https:// URL")
            if not set(self.algorithms) <= ASYMMETRIC_ALGORITHMS:
                raise ConfigError("JWT_JWKS_URL works only with asymmetric JWT_ALGORITHMS")
            for name in ("jwks_min_refetch_s", "jwks_refresh_s", "jwks_timeout_s"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{_env_name(name)} must be a positive number of seconds")
        if self.allowed_origins_file:
            _ = self.origins  # reads and checks the file
        unknown = set(self.algorithms) - HS_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown or "none" in {a.lower() for a in self.algorithms}:
            raise ConfigError(f"JWT_ALGORITHMS has unsupported values: {sorted(unknown)}")
        if self.jwt_secret:
            if len(self.jwt_secret.encode()) < MIN_HS_SECRET_BYTES:
                raise ConfigError(
                    f"JWT_SECRET is too weak: {len(self.jwt_secret.encode())} bytes, "
                    f"HS256 needs at least {MIN_HS_SECRET_BYTES}"
                )
            if not set(self.algorithms) <= HS_ALGORITHMS:
                raise ConfigError("JWT_SECRET works only with HS256/HS384/HS512 in JWT_ALGORITHMS")
        if self.jwt_public_key:
            if not set(self.algorithms) <= ASYMMETRIC_ALGORITHMS:
                # Accepting HS* with a public key is the classic key-confusion hole.
                raise ConfigError("JWT_PUBLIC_KEY works only with asymmetric JWT_ALGORITHMS")
            key = self.verify_key
            if "-----BEGIN" not in key:
                raise ConfigError("JWT_PUBLIC_KEY is not a PEM public key")
        if self.redis_url is not None:
            scheme = urlsplit(self.redis_url).scheme
            if scheme not in {"redis", "rediss", "unix", "redis+sentinel", "redis+cluster"}:
                raise ConfigError(
                    f"REDIS_URL must start with redis://, rediss://, unix://, "
                    f"redis+sentinel:// or redis+cluster://, got "
                    f"{scheme + '://' if scheme else 'no scheme'}"
                )
            try:  # the query options hub reads (wait_replicas, wait_ms; shards)
                if scheme == "redis+cluster":
                    from hub.dispatch.cluster import parse_cluster_url

                    parse_cluster_url(self.redis_url)
                else:
                    from hub.dispatch.redis import wait_options

                    wait_options(self.redis_url)
            except ValueError as exc:
                raise ConfigError(f"REDIS_URL: {exc}") from None
        for name in ("history_size", "outbox_limit", "max_message_bytes", "max_data_bytes",
                     "max_subscribe_types", "client_burst", "max_connections",
                     "max_connections_per_user", "refusal_limit",
                     "history_concurrency", "redis_max_connections", "max_header_bytes",
                     "max_headers", "max_pending_connections", "max_pending_per_address",
                     "journal_max_events", "sse_heartbeat_s", "sse_retry_ms",
                     "consumer_max_per_user", "consumer_max_total"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)} must be a positive number")
        for name in ("ping_interval_s", "ping_timeout_s", "socketio_unbound_limit",
                     "socketio_unbound_per_address", "socketio_connect_timeout_s",
                     "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)} must be a positive number")
        if self.ping_interval_s < 1:
            # python-engineio advertises the interval in whole seconds (rounded down).
            raise ConfigError("HUB_PING_INTERVAL_S must be at least 1 (seconds)")
        if self.refusal_window_s <= 0:
            raise ConfigError("HUB_REFUSAL_WINDOW_S must be a positive number")
        if self.replay_window < 0 or self.resume_hold_s < 0:
            raise ConfigError("HUB_REPLAY_WINDOW and HUB_RESUME_HOLD_S must not be negative")
        if self.client_rate <= 0 or self.shutdown_timeout_s <= 0 or self.jwt_leeway_s < 0:
            raise ConfigError("HUB_CLIENT_RATE and HUB_SHUTDOWN_TIMEOUT_S must be positive, "
                              "HUB_JWT_LEEWAY_S not negative")
        for name in ("handshake_timeout_s", "close_timeout_s", "ping_interval_s",
                     "ping_timeout_s", "max_token_lifetime_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)} must be a positive number of seconds")
        if self.consumer_max_lag < 0:
            raise ConfigError("HUB_CONSUMER_MAX_LAG must not be negative (0: HUB_HISTORY_SIZE)")
        if self.connections_registry_s <= 0:
            raise ConfigError("HUB_CONNECTIONS_REGISTRY_S must be a positive number of seconds")
        if self.token_expiring_lead_s < 0:
            raise ConfigError("HUB_TOKEN_EXPIRING_LEAD_S must not be negative")
        if self.max_body_bytes < 0:
            raise ConfigError("HUB_MAX_BODY_BYTES must not be negative (0: automatic)")
        for proxy in self.trusted_proxies:
            if proxy == "*":  # any peer: only when nothing but the proxy reaches hub
                continue
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(f"HUB_TRUSTED_PROXIES entry {proxy!r} is not an IP address "
                                  "or network like 10.0.0.0/8") from None
        for origin in self.allowed_origins:
            if origin != "*" and not urlsplit(origin).netloc:
                raise ConfigError(
                    f"HUB_ALLOWED_ORIGINS entry {origin!r} is not an origin like "
                    "https://dash.example.com"
                )
        from hub.events import BUILTIN_TYPES, is_type_name

        for name in self.extra_event_types:
            if not is_type_name(name):
                raise ConfigError(f"HUB_EXTRA_EVENT_TYPES entry {name!r} is not a valid type "
                                  "name (1 to 64 letters, digits, _ . : -)")
        configured = len(set(BUILTIN_TYPES) | set(self.extra_event_types))
        if self.max_event_types < configured:
            raise ConfigError(f"HUB_MAX_EVENT_TYPES must be at least {configured} (the spec's "
                              "types and HUB_EXTRA_EVENT_TYPES)")


_ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "jwt_secret": "JWT_SECRET",
    "jwt_public_key": "JWT_PUBLIC_KEY",
    "jwt_algorithms": "JWT_ALGORITHMS",
    "jwt_issuer": "JWT_ISSUER",
    "jwt_audience": "JWT_AUDIENCE",
    "jwt_secret_file": "JWT_SECRET_FILE",
    "jwt_jwks_url": "JWT_JWKS_URL",
}
_EMPTY_ALLOWED = frozenset({"legacy_channel"})


def _env_name(field_name: str) -> str:
    return _ENV_NAMES.get(field_name, "HUB_" + field_name.upper())


def _parse(field_name: str, env_name: str, raw: str, type_: Any) -> Any:
    kind = str(type_)
    try:
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "int":
            return int(raw.replace("_", ""))
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
    except ValueError:
        raise ConfigError(f"{env_name} has an invalid value {raw!r}") from None
    return raw


def _read_file(value: str, name: str) -> str:
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: file {str(path)!r} is not UTF-8 text") from None


def _read_key(value: str, name: str) -> str:
    if "-----BEGIN" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read key file {str(path)!r}: {exc.strerror}") from None
