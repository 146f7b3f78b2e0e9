"""hub: a real-time event hub — the /ws/events WebSocket protocol and Socket.IO on one
dispatcher, across instances with Redis between them.

The public names are imported on first use (as the websockets library does), so
``import hub.client`` loads neither the server nor its dependencies."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hub._version import __version__

if TYPE_CHECKING:
    from hub.app import Hub, HubApp, create_app
    from hub.config import Settings
    from hub.events import Event
    from hub.publish import Publisher

__all__ = ["Event", "Hub", "HubApp", "Publisher", "Settings", "__version__", "create_app"]

_LAZY = {
    "Event": "hub.events",
    "Hub": "hub.app",
    "HubApp": "hub.app",
    "Publisher": "hub.publish",
    "Settings": "hub.config",
    "create_app": "hub.app",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
