"""Every error hub raises on purpose derives from :class:`HubError`::

    HubError
    ├── ConfigError          a setting is missing or invalid; start-up stops with one line
    ├── AuthError            a token is missing, malformed, forged, expired or not allowed
    ├── EventError           a published event is invalid (unknown type, bad field, too big)
    ├── ProtocolError        a client message on /ws/events or Socket.IO is malformed
    ├── BackendUnavailable   the dispatcher's backend (Redis) cannot take the event now
    └── ClientError          raised by hub.client (the Python subscriber)
        ├── AuthenticationFailed   the hub refused the token (4003 / HTTP 401/403)
        ├── SubscriptionRefused    the hub refused the subscription (unknown type, bad id)
        └── ConnectionLost         reconnecting failed for longer than retry_for

Each carries a stable machine-readable ``code`` (an :class:`ErrorCode`) that the
transports put on the wire; :class:`CloseCode` names the WebSocket close codes. This
module imports nothing, so the server, the client and ``hub tail`` share it.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every machine-readable error code hub sends or raises (the wire carries the value)."""

    # the exception classes' defaults
    HUB_ERROR = "hub_error"
    CONFIG_ERROR = "config_error"
    UNAUTHORIZED = "unauthorized"
    INVALID_EVENT = "invalid_event"
    PROTOCOL_ERROR = "protocol_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    JOURNAL_FULL = "journal_full"
    CLIENT_ERROR = "client_error"
    AUTHENTICATION_FAILED = "authentication_failed"
    CONNECTION_LOST = "connection_lost"
    # authentication and origin
    MISSING_TOKEN = "missing_token"
    MALFORMED_TOKEN = "malformed_token"
    BAD_ALGORITHM = "bad_algorithm"
    BAD_SIGNATURE = "bad_signature"
    BAD_LIFETIME = "bad_lifetime"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    WRONG_CLAIMS = "wrong_claims"
    NO_SIGNING_KEY = "no_signing_key"
    UNKNOWN_KEY = "unknown_key"  # JWT_JWKS_URL: the token's kid is not in the key set
    FORBIDDEN = "forbidden"
    SUBJECT_MISMATCH = "subject_mismatch"  # a refresh token for another user or tenant
    TOKEN_REVOKED = "token_revoked"
    INVALID_REVOCATION = "invalid_revocation"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    # client messages and subscriptions
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_ACTION = "unknown_action"
    INVALID_EVENT_TYPES = "invalid_event_types"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    TOO_MANY_EVENT_TYPES = "too_many_event_types"
    INVALID_LAST_EVENT_ID = "invalid_last_event_id"
    RESUME_IN_PROGRESS = "resume_in_progress"
    HISTORY_UNAVAILABLE = "history_unavailable"
    NOT_CONNECTED = "not_connected"
    RATE_LIMITED = "rate_limited"
    INVALID_FILTER = "invalid_filter"
    INVALID_PARAMETER = "invalid_parameter"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # durable consumers (hub.consumers)
    INVALID_CONSUMER = "invalid_consumer"  # a consumer name that is not 1-64 of [A-Za-z0-9_.:-]
    TOO_MANY_CONSUMERS = "too_many_consumers"  # HUB_CONSUMER_MAX_PER_USER / _MAX_TOTAL
    CONSUMER_UNAVAILABLE = "consumer_unavailable"  # its cursor could not be read or stored
    UNKNOWN_CONSUMER = "unknown_consumer"  # DELETE /consumers: no such consumer
    CONSUMER_CONFLICT = "consumer_conflict"  # the connection is bound to another consumer
    NOT_A_CONSUMER = "not_a_consumer"  # an ack on a connection without a consumer
    INVALID_ACK = "invalid_ack"  # an ack whose id is not an event id
    UNKNOWN_ACK_ID = "unknown_ack_id"  # an ack of an id after the last one sent
    # publishing and requests
    EVENT_TOO_LARGE = "event_too_large"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # Socket.IO sessions
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    TOO_MANY_SESSIONS = "too_many_sessions"
    # live reload (POST /admin/reload, SIGHUP)
    RELOAD_FAILED = "reload_failed"


class CloseCode(enum.IntEnum):
    """WebSocket close codes hub sends (``/ws/events`` and Socket.IO's refusals)."""

    GOING_AWAY = 1001  # server shutting down: reconnect elsewhere and resume
    POLICY_VIOLATION = 1008  # message flood, unsupported protocol version
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # a send to the connection failed inside the server
    TRY_AGAIN_LATER = 1013  # connection limit reached
    UNAUTHORIZED = 4003  # missing/invalid/expired token, or a foreign browser Origin
    SLOW_CONSUMER = 4008


class HubError(Exception):
    """Root of every error hub raises on purpose."""

    code: str = ErrorCode.HUB_ERROR

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(HubError):
    """A setting is missing or invalid."""

    code = ErrorCode.CONFIG_ERROR


class AuthError(HubError):
    """The caller could not be authenticated or is not allowed; ``code`` names the reason."""

    code = ErrorCode.UNAUTHORIZED


class EventError(HubError):
    """A published event is invalid; ``field`` names the (first) part at fault, ``fields``
    every one of them."""

    code = ErrorCode.INVALID_EVENT

    def __init__(self, message: str, *, field: str, code: str | None = None,
                 fields: tuple[str, ...] = ()) -> None:
        super().__init__(message, code=code)
        self.field = field
        self.fields = fields or (field,)


class ProtocolError(HubError):
    """A client message is malformed; the connection stays open."""

    code = ErrorCode.PROTOCOL_ERROR


class BackendUnavailable(HubError):
    """The backend cannot accept the event right now (e.g. Redis is down)."""

    code = ErrorCode.BACKEND_UNAVAILABLE


class ClientError(HubError):
    """Root of the errors :func:`hub.client.subscribe` raises."""

    code = ErrorCode.CLIENT_ERROR


class AuthenticationFailed(ClientError):
    """The hub refused the token (close code 4003): missing, invalid, expired or a foreign
    Origin. ``reason`` is the hub's close reason."""

    code = ErrorCode.AUTHENTICATION_FAILED

    def __init__(self, reason: str) -> None:
        super().__init__(f"the hub refused the token: {reason or 'unauthorized'}")
        self.reason = reason


class SubscriptionRefused(ClientError):
    """The hub refused the subscription (``code`` is the hub's error code)."""


class ConnectionLost(ClientError):
    """The hub could not be reached again within ``retry_for`` seconds."""

    code = ErrorCode.CONNECTION_LOST
