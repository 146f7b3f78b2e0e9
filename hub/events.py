"""Event types, per-type validation, the envelope and its encodings. No I/O here.

An event travels as the envelope ``{"id", "type", "timestamp", "data"}``. It is encoded
once per instance: :class:`Event` caches its JSON text, and keeps each transport's wire
encoding (built by the transport, see :meth:`Event.encoded`), so a broadcast to thousands
of clients serialises it once per transport at most.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from hub.errors import ErrorCode, EventError

THREAT_DETECTED: Final = "threat_detected"
PROVIDER_HEALTH_CHANGE: Final = "provider_health_change"
COST_THRESHOLD_ALERT: Final = "cost_threshold_alert"
SYSTEM_STATUS: Final = "system_status"
BUILTIN_TYPES: Final = (
    THREAT_DETECTED, PROVIDER_HEALTH_CHANGE, COST_THRESHOLD_ALERT, SYSTEM_STATUS,
)

Validator = Callable[[dict[str, Any]], None]


def _require_str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise EventError(f"data.{name} is required and must be a non-empty string",
                         field=f"data.{name}")
    return value


def _require_choice(data: dict[str, Any], name: str, choices: Iterable[str]) -> None:
    value = _require_str(data, name)
    options = tuple(choices)
    if value not in options:
        raise EventError(f"data.{name} must be one of {', '.join(options)}; got {value!r}",
                         field=f"data.{name}")


def _optional_number(data: dict[str, Any], name: str) -> None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise EventError(f"data.{name} must be a number", field=f"data.{name}")


def _optional_str(data: dict[str, Any], name: str) -> None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise EventError(f"data.{name} must be a string", field=f"data.{name}")


def _threat_detected(data: dict[str, Any]) -> None:
    _require_choice(data, "severity", ("low", "medium", "high", "critical"))
    _require_str(data, "attack_type")
    confidence = data.get("confidence")
    if (isinstance(confidence, bool) or not isinstance(confidence, int | float)
            or not 0 <= confidence <= 1):
        raise EventError("data.confidence is required and must be a number from 0 to 1",
                         field="data.confidence")
    _require_choice(data, "action_taken", ("blocked", "allowed", "flagged", "sanitized"))
    _optional_str(data, "threat_id")
    if "threat_id" not in data:
        data["threat_id"] = "thr_" + secrets.token_hex(6)


HEALTH_STATES: Final = ("healthy", "degraded", "unhealthy", "unknown")


def _provider_health_change(data: dict[str, Any]) -> None:
    _require_str(data, "provider")
    _require_choice(data, "old_status", HEALTH_STATES)
    _require_choice(data, "new_status", HEALTH_STATES)


def _cost_threshold_alert(data: dict[str, Any]) -> None:
    _require_choice(data, "severity", ("info", "warning", "error", "critical"))
    _require_str(data, "message")
    for name in ("threshold", "current_cost"):
        _optional_number(data, name)
    for name in ("period", "rule_name"):
        _optional_str(data, name)


def _system_status(data: dict[str, Any]) -> None:
    _require_str(data, "status")
    for name in ("instance_id", "version", "message"):
        _optional_str(data, name)


def _any_object(data: dict[str, Any]) -> None:
    """Configured extra types carry any JSON object."""


BUILTIN_VALIDATORS: Final[Mapping[str, Validator]] = {
    THREAT_DETECTED: _threat_detected,
    PROVIDER_HEALTH_CHANGE: _provider_health_change,
    COST_THRESHOLD_ALERT: _cost_threshold_alert,
    SYSTEM_STATUS: _system_status,
}


def format_timestamp(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z``: ``2025-01-15T10:30:00.123Z``."""
    return _format_utc(datetime.fromtimestamp(epoch_s, UTC))


def _format_utc(moment: datetime) -> str:
    # Not strftime: its %Y is not zero-padded for years before 1000 on every platform.
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z")


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Epoch numbers above this are taken as milliseconds (in seconds it is the year 5138).
_EPOCH_MS_ABOVE: Final = 1e11


def parse_timestamp(value: object) -> str | None:
    """``value`` as RFC 3339 UTC with milliseconds and a ``Z`` if it is a timestamp, else
    None. Total: never raises, whatever ``value`` is.

    Accepted: ISO 8601 / RFC 3339 text with any offset (``+00:00`` as Python's
    ``isoformat()`` writes it, ``Z``, ``-05:00``), naive text (taken as UTC), and epoch
    numbers or numeric text in seconds (as ``time.time()``) or milliseconds (above 1e11).
    Moments that fall outside the years 1 to 9999 once in UTC are not timestamps."""
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return _from_epoch(float(value))
        if not isinstance(value, str) or len(value) > 64:
            return None
        text = value.strip()
        try:
            moment = datetime.fromisoformat(
                text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
        except ValueError:
            try:
                return _from_epoch(float(text))
            except ValueError:
                return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return _format_utc(moment.astimezone(UTC))
    except (OverflowError, ValueError, OSError):
        # e.g. 9999-12-31T23:59:59-23:59, which is in the year 10000 in UTC
        return None


def _from_epoch(number: float) -> str | None:
    if not math.isfinite(number):
        return None
    if abs(number) > _EPOCH_MS_ABOVE:
        number /= 1000
    return _format_utc(_EPOCH + timedelta(seconds=number))


def id_key(event_id: str) -> tuple[int, int]:
    """Sort key of an id ``<ms>-<seq>`` (the Redis Stream id format); raises ValueError."""
    ms, _, seq = event_id.partition("-")
    if not ms.isdigit() or not seq.isdigit() or len(event_id) > 41:
        raise ValueError(f"not an event id: {event_id!r}")
    return int(ms), int(seq)


def is_event_id(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        id_key(value)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class Event:
    """One stamped event; :meth:`envelope` is what clients receive."""

    id: str
    type: str
    timestamp: str
    data: dict[str, Any]
    tenant: str | None = None
    _text: str | None = field(default=None, repr=False)
    _key: tuple[int, int] | None = field(default=None, repr=False)
    # Each transport's wire encodings of it, built on first use by that transport and then
    # shared by every recipient (see hub.transports): the event knows none of them.
    wire: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # False while the event is held in the publishing instance's journal, not in Redis yet
    # (an outage): accepted and delivered locally, not shared with other instances yet.
    shared: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        tenant = self.data.get("tenant_id")
        self.tenant = str(tenant) if tenant is not None else None

    @property
    def key(self) -> tuple[int, int]:
        """The id as a sortable pair (parsed once)."""
        if self._key is None:
            self._key = id_key(self.id)
        return self._key

    def envelope(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "timestamp": self.timestamp, "data": self.data}

    @property
    def text(self) -> str:
        """The envelope as JSON text, encoded on first use and then shared by every recipient."""
        if self._text is None:
            self._text = orjson.dumps(self.envelope()).decode()
        return self._text

    def encoded(self, kind: str, encode: Callable[[Event], Any]) -> Any:
        """``encode(self)``, computed once per event and kept under ``kind``."""
        wire = self.wire
        if wire is None:
            wire = self.wire = {}
        else:  # the fan-out's hot path: one lookup
            value = wire.get(kind)
            if value is not None:
                return value
        value = wire[kind] = encode(self)
        return value

    def body(self) -> bytes:
        """What a backend stores: the envelope without the id (the store assigns the id)."""
        return orjson.dumps({"type": self.type, "timestamp": self.timestamp, "data": self.data})

    @classmethod
    def from_body(cls, event_id: str, body: bytes | str) -> Event:
        raw = orjson.loads(body)
        return cls(id=event_id, type=raw["type"], timestamp=raw["timestamp"], data=raw["data"])


TYPE_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_type_name(value: object) -> bool:
    """Whether ``value`` can name an event type: 1 to 64 letters, digits, ``_ . : -``
    (type names become Socket.IO event names, room names and metric labels)."""
    return isinstance(value, str) and TYPE_NAME.fullmatch(value) is not None


class EventTypes:
    """The event types an instance knows and how each one's ``data`` is validated.

    Two kinds of names: the publishable ones (the spec's four and ``HUB_EXTRA_EVENT_TYPES``),
    which ``POST /events`` and ``hub.publish`` accept, and, when types are ``open``, names
    first seen on the proxy's channel or in the stream (:meth:`learn`), up to ``max_types``
    in all. Clients can subscribe to both kinds."""

    def __init__(self, extra: Iterable[str] = (), *, open_types: bool = False,
                 max_types: int = 0) -> None:
        self._validators: dict[str, Validator] = dict(BUILTIN_VALIDATORS)
        for name in extra:
            self._validators.setdefault(name, _any_object)
        self._learned: dict[str, None] = {}
        self.open = open_types
        self.max_types = max(max_types, len(self._validators))

    @property
    def names(self) -> tuple[str, ...]:
        return (*self._validators, *self._learned)

    @property
    def publishable(self) -> tuple[str, ...]:
        """The types ``POST /events`` and ``hub.publish`` accept."""
        return tuple(self._validators)

    def __contains__(self, name: object) -> bool:
        return name in self._validators or name in self._learned

    def unknown(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n not in self]

    def learn(self, name: str) -> bool:
        """Know ``name`` from now on (a type met on the legacy channel or in the stream).
        False when types are closed, the name is not a type name, or ``max_types`` are
        known already."""
        if name in self:
            return True
        if not self.open or not is_type_name(name) or len(self.names) >= self.max_types:
            return False
        self._learned[name] = None
        return True

    def validate(self, type_: object, data: object, *,
                 max_bytes: int) -> tuple[str, dict[str, Any]]:
        """Check an event before it is stamped. Returns ``(type, data)``; ``data`` is a copy
        with generated fields (``threat_id``) filled in. Raises :class:`EventError`; with
        several faults, its message and ``fields`` name each of them."""
        if not isinstance(type_, str) or not type_:
            if not isinstance(data, dict):
                raise EventError("type is required and must be a string; "
                                 "data must be a JSON object",
                                 field="type", fields=("type", "data"))
            raise EventError("type is required and must be a string", field="type")
        validator = self._validators.get(type_)
        if validator is None:
            message = (f"unknown event type {type_!r}; "
                       f"known types: {', '.join(self._validators)}")
            if not isinstance(data, dict):
                raise EventError(message + "; data must be a JSON object", field="type",
                                 code=ErrorCode.UNKNOWN_EVENT_TYPE, fields=("type", "data"))
            raise EventError(message, field="type", code=ErrorCode.UNKNOWN_EVENT_TYPE)
        data = self._check_data(data, max_bytes)
        faults = _collect_faults(validator, data)
        tenant = data.get("tenant_id")
        if tenant is not None and not isinstance(tenant, str | int):
            faults.append(EventError("data.tenant_id must be a string", field="data.tenant_id"))
        if faults:
            raise _combined(faults)
        validator(data)  # fills in generated fields (threat_id)
        return type_, data

    def check_envelope(self, type_: object, data: object, *, max_bytes: int,
                       strict: bool) -> tuple[str, dict[str, Any], bool]:
        """Check an envelope from outside hub without changing its ``data``.

        Returns ``(type, data, conforming)``. Any type name passes when types are open and
        it can be learned; ``data`` must be a JSON object within ``max_bytes``. A known type
        whose ``data`` misses its schema is ``conforming=False``; with ``strict`` that, and
        an unknown type, raise :class:`EventError` instead."""
        if not is_type_name(type_):
            raise EventError("type is required and must be a type name (1 to 64 letters, "
                             "digits, _ . : -)", field="type")
        assert isinstance(type_, str)
        clean = self._check_data(data, max_bytes)
        validator = self._validators.get(type_)
        if validator is None and (strict or not self.learn(type_)):
            if strict or not self.open:
                raise EventError(f"unknown event type {type_!r}", field="type",
                                 code=ErrorCode.UNKNOWN_EVENT_TYPE)
            raise EventError(
                f"event type {type_!r} is new and {self.max_types} types are known already "
                "(HUB_MAX_EVENT_TYPES)", field="type", code=ErrorCode.TOO_MANY_EVENT_TYPES)
        faults = _collect_faults(validator, clean) if validator is not None else []
        if faults and strict:
            raise _combined(faults)
        return type_, clean, not faults

    @staticmethod
    def _check_data(data: object, max_bytes: int) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise EventError("data must be a JSON object", field="data")
        try:
            size = len(orjson.dumps(data))
        except TypeError as exc:
            raise EventError(f"data is not JSON-serialisable: {exc}", field="data") from None
        if size > max_bytes:
            raise EventError(f"data is {size} bytes, more than the limit of {max_bytes}",
                             field="data", code=ErrorCode.EVENT_TOO_LARGE)
        return dict(data)


def _collect_faults(validator: Validator, data: dict[str, Any]) -> list[EventError]:
    """Every fault of ``data``, not only the first (``data`` is not changed): the validator
    runs again on a copy with each field it complained about set to a valid placeholder,
    until it passes (schemas have a handful of fields)."""
    faults: list[EventError] = []
    probe = dict(data)
    for _ in range(len(_PLACEHOLDER) + 1):
        try:
            validator(probe)
        except EventError as exc:
            faults.append(exc)
            placeholder = _PLACEHOLDER.get(exc.field.removeprefix("data."))
            if placeholder is None:
                break
            probe[exc.field.removeprefix("data.")] = placeholder
        else:
            break
    return faults


# A value that satisfies each schema field, to look past one fault for the next one.
_PLACEHOLDER: Final[dict[str, Any]] = {
    "severity": "critical", "attack_type": "x", "confidence": 0.5, "action_taken": "blocked",
    "provider": "x", "old_status": "unknown", "new_status": "unknown", "message": "x",
    "status": "x", "threat_id": "thr_x", "threshold": 0, "current_cost": 0, "period": "x",
    "rule_name": "x", "instance_id": "x", "version": "x",
}


def _combined(faults: list[EventError]) -> EventError:
    if len(faults) == 1:
        return faults[0]
    return EventError("; ".join(f.message for f in faults), field=faults[0].field,
                      code=faults[0].code, fields=tuple(f.field for f in faults))


def now_timestamp() -> str:
    return format_timestamp(time.time())
