"""hub: a real-time event hub — the /ws/events WebSocket protocol and Socket.IO on one
dispatcher, across instances with Redis between them."""

from __future__ import annotations

__version__ = "0.1.0"

from hub.app import Hub, HubApp, create_app
from hub.config import Settings
from hub.events import Event
from hub.publish import Publisher

__all__ = ["Event", "Hub", "HubApp", "Publisher", "Settings", "__version__", "create_app"]
