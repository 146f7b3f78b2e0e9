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

Each carries a stable machine-readable ``code`` that the transports put on the wire.
"""

from __future__ import annotations


class HubError(Exception):
    """Root of every error hub raises on purpose."""

    code = "hub_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(HubError):
    """A setting is missing or invalid."""

    code = "config_error"


class AuthError(HubError):
    """The caller could not be authenticated or is not allowed; ``code`` names the reason."""

    code = "unauthorized"


class EventError(HubError):
    """A published event is invalid; ``field`` names the (first) part at fault, ``fields``
    every one of them."""

    code = "invalid_event"

    def __init__(self, message: str, *, field: str, code: str | None = None,
                 fields: tuple[str, ...] = ()) -> None:
        super().__init__(message, code=code)
        self.field = field
        self.fields = fields or (field,)


class ProtocolError(HubError):
    """A client message is malformed; the connection stays open."""

    code = "protocol_error"


class BackendUnavailable(HubError):
    """The backend cannot accept the event right now (e.g. Redis is down)."""

    code = "backend_unavailable"
