"""Event dispatch: one dispatcher per instance over a memory or Redis backend."""

from hub.dispatch.base import Backend, History
from hub.dispatch.dispatcher import Dispatcher, ResumeResult

__all__ = ["Backend", "Dispatcher", "History", "ResumeResult"]
