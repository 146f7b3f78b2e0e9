"""Event validation (hub/events.py): every fault named at once, generated fields only on
valid data, open types learned up to their bound."""

from __future__ import annotations

import pytest

from hub.errors import EventError
from hub.events import EventTypes
from tests.helpers import THREAT


def test_validate_names_every_bad_field() -> None:
    with pytest.raises(EventError) as caught:
        EventTypes().validate("threat_detected", {"severity": "dire", "confidence": 7},
                              max_bytes=1024)
    assert caught.value.fields == ("data.severity", "data.attack_type", "data.confidence",
                                   "data.action_taken")
    assert caught.value.field == "data.severity"
    for name in caught.value.fields:
        assert name in caught.value.message
    with pytest.raises(EventError) as both:
        EventTypes().validate("nope", "not an object", max_bytes=1024)
    assert both.value.fields == ("type", "data")


def test_validate_fills_generated_fields_on_a_copy() -> None:
    data = dict(THREAT)
    _, clean = EventTypes().validate("threat_detected", data, max_bytes=1024)
    assert clean["threat_id"].startswith("thr_")
    assert "threat_id" not in data


def test_check_envelope_keeps_data_and_learns_up_to_the_bound() -> None:
    types = EventTypes(open_types=True, max_types=5)
    odd = {"rule_name": "x", "timestamp": 1.5}
    assert types.check_envelope("system_status", odd, max_bytes=1024, strict=False) == (
        "system_status", odd, False)
    assert types.check_envelope("report_event", {}, max_bytes=1024, strict=False)[2] is True
    assert "report_event" in types.names and "report_event" not in types.publishable
    with pytest.raises(EventError) as full:
        types.check_envelope("scan_event", {}, max_bytes=1024, strict=False)
    assert full.value.code == "too_many_event_types"
    with pytest.raises(EventError) as strict:
        EventTypes(open_types=True).check_envelope("system_status", odd, max_bytes=1024,
                                                   strict=True)
    assert strict.value.fields == ("data.status",)
