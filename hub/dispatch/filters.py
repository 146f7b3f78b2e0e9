"""Server-side event filters: one pure module, the same rules for every delivery path.

A filter is ``{"min_severity": NAME, FIELD: [VALUE, ...], ...}`` (on a subscribe, as JSON)
or ``min_severity=NAME&data.FIELD=V1,V2`` (query parameters of ``GET /events/stream`` and
``GET /events``); both parse to the same :class:`EventFilter`. An event passes when it
passes every key:

* ``min_severity``: each type's own order. ``threat_detected``: low < medium < high <
  critical; ``cost_threshold_alert``: info < warning < error < critical. The name is
  ranked in the order it belongs to (``high`` and ``error`` are both rank 3, ``critical``
  rank 4 in both) and an event passes when its severity ranks at least as high in its own
  type's order. An event of such a type without a valid severity does not pass. Types
  without a severity order (``provider_health_change``, ``system_status``, extra types)
  are not affected by ``min_severity``: the key narrows severities, not types (``types``
  does that).
* any other key names a field of ``data``; the event passes when that field holds one of
  the listed values (strings, numbers or booleans, compared by their JSON text, so
  ``data.count=3`` matches ``3``; a missing field, an object or a list never matches).

A filter only ever narrows: it is applied after the subscription's types and the token's
tenant. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from hub.errors import ErrorCode, ProtocolError
from hub.events import COST_THRESHOLD_ALERT, THREAT_DETECTED, Event

SEVERITY_ORDERS: Final[Mapping[str, tuple[str, ...]]] = {
    THREAT_DETECTED: ("low", "medium", "high", "critical"),
    COST_THRESHOLD_ALERT: ("info", "warning", "error", "critical"),
}
# A severity name's rank (1-based) in the order it belongs to.
SEVERITY_RANKS: Final[Mapping[str, int]] = {
    name: rank for order in SEVERITY_ORDERS.values()
    for rank, name in enumerate(order, start=1)
}
_TYPE_RANKS: Final[Mapping[str, Mapping[str, int]]] = {
    type_: {name: rank for rank, name in enumerate(order, start=1)}
    for type_, order in SEVERITY_ORDERS.items()
}

MIN_SEVERITY: Final = "min_severity"
DATA_PREFIX: Final = "data."
MAX_FIELDS: Final = 16
MAX_VALUES: Final = 64
MAX_NAME: Final = 64
MAX_VALUE: Final = 256


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(message, code=ErrorCode.INVALID_FILTER)


def value_key(value: object) -> str | None:
    """The form a value is compared in: a string as is, a number or boolean as its JSON
    text; None for anything else (it never matches)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)  # its JSON text, at any size (orjson refuses past 64 bits)
    if isinstance(value, float):
        return orjson.dumps(value).decode()
    return None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """A parsed filter. ``fields``: (data field, allowed values), sorted by field."""

    min_rank: int | None = None
    fields: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def empty(self) -> bool:
        return self.min_rank is None and not self.fields

    def matches(self, event: Event) -> bool:
        data = event.data
        if self.min_rank is not None:
            ranks = _TYPE_RANKS.get(event.type)
            if ranks is not None:
                severity = data.get("severity")
                rank = ranks.get(severity) if isinstance(severity, str) else None
                if rank is None or rank < self.min_rank:
                    return False
        for name, allowed in self.fields:
            if name not in data or value_key(data[name]) not in allowed:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        """The filter as the JSON a subscribe takes (what the hub echoes back)."""
        out: dict[str, Any] = {}
        if self.min_rank is not None:
            out[MIN_SEVERITY] = _rank_name(self.min_rank)
        for name, allowed in self.fields:
            out[name] = sorted(allowed)
        return out

    def query(self) -> list[tuple[str, str]]:
        """The filter as query parameters (``min_severity``, ``data.FIELD``)."""
        params: list[tuple[str, str]] = []
        if self.min_rank is not None:
            params.append((MIN_SEVERITY, _rank_name(self.min_rank)))
        for name, allowed in self.fields:
            params.append((DATA_PREFIX + name, ",".join(sorted(allowed))))
        return params


def _rank_name(rank: int) -> str:
    return SEVERITY_ORDERS[THREAT_DETECTED][rank - 1]


def _rank(value: object) -> int:
    if not isinstance(value, str) or value not in SEVERITY_RANKS:
        names = ", ".join(sorted(SEVERITY_RANKS))
        raise _invalid(f"min_severity must be one of: {names}")
    return SEVERITY_RANKS[value]


def _field_name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise _invalid(f"filter keys must be data field names of 1 to {MAX_NAME} characters")
    return name


def _values(name: str, raw: object) -> frozenset[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or len(items) > MAX_VALUES:
        raise _invalid(f"filter {name!r} must list 1 to {MAX_VALUES} values")
    keys = set()
    for item in items:
        key = value_key(item)
        if key is None or len(key) > MAX_VALUE:
            raise _invalid(f"filter {name!r} takes strings, numbers or booleans "
                           f"(at most {MAX_VALUE} characters each)")
        keys.add(key)
    return frozenset(keys)


def _build(min_rank: int | None, fields: dict[str, frozenset[str]]) -> EventFilter | None:
    if len(fields) > MAX_FIELDS:
        raise _invalid(f"a filter takes at most {MAX_FIELDS} data fields")
    built = EventFilter(min_rank, tuple(sorted(fields.items())))
    return None if built.empty else built


def parse_filter(value: object) -> EventFilter | None:
    """A subscribe's ``filter`` (JSON). None or ``{}``: no filter. Raises ProtocolError
    ``invalid_filter`` for anything malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("filter must be a JSON object")
    min_rank = None
    fields: dict[str, frozenset[str]] = {}
    for raw_name, raw in value.items():
        if raw_name == MIN_SEVERITY:
            min_rank = _rank(raw)
            continue
        name = _field_name(raw_name)
        fields[name] = _values(name, raw)
    return _build(min_rank, fields)


def parse_query(params: Iterable[tuple[str, str]]) -> EventFilter | None:
    """The filter among query parameters: ``min_severity`` and every ``data.FIELD``
    (comma-separated values; repeating a parameter adds values). Other parameters are
    the caller's. Raises ProtocolError ``invalid_filter`` for anything malformed."""
    min_rank = None
    fields: dict[str, set[str]] = {}
    for key, raw in params:
        if key == MIN_SEVERITY:
            min_rank = _rank(raw)
        elif key.startswith(DATA_PREFIX):
            name = _field_name(key[len(DATA_PREFIX):])
            values = raw.split(",")
            if not all(values):
                raise _invalid(f"filter {key!r} must list non-empty values, comma-separated")
            merged = fields.setdefault(name, set())
            merged.update(_values(name, values))
            if len(merged) > MAX_VALUES:
                raise _invalid(f"filter {name!r} must list 1 to {MAX_VALUES} values")
    return _build(min_rank, {name: frozenset(v) for name, v in fields.items()})


def is_filter_param(key: str) -> bool:
    return key == MIN_SEVERITY or key.startswith(DATA_PREFIX)


def passes(flt: EventFilter | None, event: Event) -> bool:
    return flt is None or flt.matches(event)


def split_params(pairs: Iterable[tuple[str, str]], names: Iterable[str]
                 ) -> tuple[dict[str, str], EventFilter | None]:
    """Query parameters of ``GET /events`` and ``/events/stream``: the plain ones among
    ``names`` (each at most once) and the filter. Any other parameter is refused
    (``invalid_parameter``): a mistyped filter must not silently widen the stream."""
    allowed = set(names)
    plain: dict[str, str] = {}
    filter_pairs: list[tuple[str, str]] = []
    for key, value in pairs:
        if is_filter_param(key):
            filter_pairs.append((key, value))
        elif key in allowed and key not in plain:
            plain[key] = value
        else:
            known = ", ".join(sorted(allowed | {MIN_SEVERITY, DATA_PREFIX + "FIELD"}))
            raise ProtocolError(f"unknown or repeated query parameter {key[:64]!r}; "
                                f"known: {known}", code=ErrorCode.INVALID_PARAMETER)
    return plain, parse_query(filter_pairs)


def parse_types(value: str) -> list[str]:
    """``types=a,b``: the names (non-empty, comma-separated)."""
    names = value.split(",")
    if not all(names):
        raise ProtocolError("types must list event type names, comma-separated",
                            code=ErrorCode.INVALID_EVENT_TYPES)
    return names
