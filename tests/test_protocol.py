"""The /ws/events client protocol and event validation as pure functions, plus fuzzing."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.errors import EventError, ProtocolError
from hub.events import EventTypes, format_timestamp, id_key, parse_timestamp
from hub.protocol import Action, parse_client_message

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)  # JSON's int range in orjson
    | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize(("text", "code"), [
    ("", "invalid_json"),
    ("{", "invalid_json"),
    ("null", "not_an_object"),
    ('"subscribe"', "not_an_object"),
    ("{}", "unknown_action"),
    ('{"action": 1}', "unknown_action"),
    ('{"action": "subscribe"}', "invalid_event_types"),
])
def test_parse_errors_have_distinct_codes(text: str, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(text)
    assert caught.value.code == code


def test_parse_subscribe() -> None:
    message = parse_client_message(
        '{"action": "subscribe", "event_types": ["threat_detected"], "last_event_id": "1-0"}')
    assert message.action is Action.SUBSCRIBE
    assert message.event_types == ["threat_detected"]
    assert message.last_event_id == "1-0"


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_text_parses_or_raises_protocol_error(text: str) -> None:
    try:
        parse_client_message(text)
    except ProtocolError as exc:
        assert exc.code in {"invalid_json", "not_an_object", "unknown_action",
                            "invalid_event_types"}


@given(json_values)
@settings(max_examples=200, deadline=None)
def test_any_json_parses_or_raises_protocol_error(value: object) -> None:
    try:
        message = parse_client_message(orjson.dumps(value).decode())
    except ProtocolError as exc:
        assert exc.code in {"not_an_object", "unknown_action", "invalid_event_types"}
    else:
        assert isinstance(message.action, Action)


@given(st.text(max_size=30), json_values)
@settings(max_examples=200, deadline=None)
def test_any_publish_is_accepted_or_names_the_field(type_: str, data: object) -> None:
    types = EventTypes()
    try:
        name, clean = types.validate(type_, data, max_bytes=4096)
    except EventError as exc:
        assert exc.field == "type" or exc.field.startswith("data")
    else:
        assert name in types and isinstance(clean, dict)


@given(st.fixed_dictionaries({
    "severity": st.sampled_from(["low", "medium", "high", "critical"]),
    "attack_type": st.text(min_size=1, max_size=20),
    "confidence": st.floats(min_value=0, max_value=1),
    "action_taken": st.sampled_from(["blocked", "allowed", "flagged", "sanitized"]),
}, optional={"extra": json_values}))
@settings(max_examples=100, deadline=None)
def test_valid_threats_always_pass_and_keep_extra_fields(data: dict[str, object]) -> None:
    _, clean = EventTypes().validate("threat_detected", data, max_bytes=1 << 20)
    assert str(clean["threat_id"]).startswith("thr_")
    assert all(clean[k] == v for k, v in data.items())


def test_extra_types_accept_any_object() -> None:
    types = EventTypes(["audit_log"])
    assert types.validate("audit_log", {"anything": [1, 2]}, max_bytes=100)[0] == "audit_log"
    with pytest.raises(EventError):
        types.validate("audit_log", [1], max_bytes=100)


def test_timestamps() -> None:
    assert format_timestamp(1736937000.1234) == "2025-01-15T10:30:00.123Z"
    assert parse_timestamp("2025-01-15T10:30:00Z") == "2025-01-15T10:30:00.000Z"
    assert parse_timestamp("2025-01-15T11:30:00+01:00") == "2025-01-15T10:30:00.000Z"
    assert parse_timestamp("yesterday") is None
    assert parse_timestamp(12) == "1970-01-01T00:00:12.000Z"  # epoch seconds (the proxy's)
    assert parse_timestamp(True) is None


def test_ids_sort_numerically() -> None:
    assert id_key("1700000000000-10") > id_key("1700000000000-9")
    with pytest.raises(ValueError):
        id_key("abc")
