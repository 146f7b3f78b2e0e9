"""The ``/ws/events`` client protocol as pure functions: text in, typed messages out.

Nothing here touches a socket, so every rule is tested without one."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from hub.consumers import check_ack_id, check_name
from hub.errors import CloseCode, ErrorCode, ProtocolError
from hub.events import now_timestamp

__all__ = ["Action", "ClientMessage", "CloseCode", "parse_client_message",
           "server_message"]


class Action(enum.Enum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PING = "ping"
    REFRESH = "refresh"  # {"action": "refresh", "token": "<jwt>"} -> token_refreshed
    ACK = "ack"  # {"action": "ack", "id": "<event id>"}: a durable consumer's cursor moves


@dataclass(frozen=True, slots=True)
class ClientMessage:
    action: Action
    event_types: Any = None  # validated against the known types by the dispatcher
    last_event_id: Any = None
    # A subscribe's "filter" (parsed by hub.dispatch.filters): whether it had the key.
    has_filter: bool = False
    filter: Any = None
    token: str | None = None  # for REFRESH
    # A subscribe's "consumer" (a checked name), or an ACK's event id.
    consumer: str | None = None
    event_id: str | None = None


def parse_client_message(text: str) -> ClientMessage:
    """Parse one client frame. Raises ProtocolError with a distinct code for each fault."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("message is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(message, dict):
        raise ProtocolError("message must be a JSON object", code=ErrorCode.NOT_AN_OBJECT)
    raw_action = message.get("action")
    try:
        action = Action(raw_action)
    except ValueError:
        known = ", ".join(a.value for a in Action)
        raise ProtocolError(f"unknown action {raw_action!r}; known actions: {known}",
                            code=ErrorCode.UNKNOWN_ACTION) from None
    if action is Action.PING:
        return ClientMessage(action)
    if action is Action.REFRESH:
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("refresh needs a token (a non-empty string)",
                                code=ErrorCode.MISSING_TOKEN)
        return ClientMessage(action, token=token)
    if action is Action.ACK:
        return ClientMessage(action, event_id=check_ack_id(message.get("id")))
    if "event_types" not in message:
        raise ProtocolError(f"{action.value} needs an event_types list",
                            code=ErrorCode.INVALID_EVENT_TYPES)
    consumer = message.get("consumer") if action is Action.SUBSCRIBE else None
    return ClientMessage(action, message["event_types"], message.get("last_event_id"),
                         action is Action.SUBSCRIBE and "filter" in message,
                         message.get("filter"),
                         consumer=None if consumer is None else check_name(consumer))


def server_message(type_: str, data: dict[str, Any] | None = None) -> str:
    """A control message in the envelope's shape: ``{"type", "timestamp", "data"}``."""
    return orjson.dumps({"type": type_, "timestamp": now_timestamp(), "data": data or {}}).decode()

