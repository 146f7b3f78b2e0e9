"""Kept for code that imports it: the exception tree lives in :mod:`hub.errors`."""

from hub.errors import (
    AuthError,
    BackendUnavailable,
    ConfigError,
    EventError,
    HubError,
    ProtocolError,
)

__all__ = ["AuthError", "BackendUnavailable", "ConfigError", "EventError", "HubError",
           "ProtocolError"]
